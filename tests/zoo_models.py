"""Tiny random configs of transformers causal LMs, one per architecture family
(tests/test_zoo.py; benchmarks/zoo_coverage.py prints what the backend reaches on each)."""
import transformers

SMALL = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
LLAMA_LIKE = dict(SMALL, hidden_size=64, intermediate_size=96, num_key_value_heads=2)
MOE = dict(LLAMA_LIKE, num_experts_per_tok=2)
ZOO = {
    "gpt2": lambda: (transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
                     transformers.GPT2LMHeadModel),
    "falcon": lambda: (transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                 vocab_size=128, new_decoder_architecture=False),
                       transformers.FalconForCausalLM),
    "opt": lambda: (transformers.OPTConfig(hidden_size=64, ffn_dim=96, word_embed_proj_dim=64, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=128, max_position_embeddings=64),
                    transformers.OPTForCausalLM),
    "gpt_neox": lambda: (transformers.GPTNeoXConfig(**SMALL, hidden_size=64, intermediate_size=96),
                         transformers.GPTNeoXForCausalLM),
    "llama": lambda: (transformers.LlamaConfig(**LLAMA_LIKE), transformers.LlamaForCausalLM),
    "qwen2": lambda: (transformers.Qwen2Config(**LLAMA_LIKE), transformers.Qwen2ForCausalLM),
    "qwen3": lambda: (transformers.Qwen3Config(**LLAMA_LIKE, head_dim=16), transformers.Qwen3ForCausalLM),
    "mistral": lambda: (transformers.MistralConfig(**LLAMA_LIKE), transformers.MistralForCausalLM),
    "phi3": lambda: (transformers.Phi3Config(**LLAMA_LIKE, pad_token_id=0), transformers.Phi3ForCausalLM),
    "gemma2": lambda: (transformers.Gemma2Config(**LLAMA_LIKE, head_dim=16), transformers.Gemma2ForCausalLM),
    "gemma3": lambda: (transformers.Gemma3TextConfig(**LLAMA_LIKE, head_dim=16), transformers.Gemma3ForCausalLM),
    "mixtral": lambda: (transformers.MixtralConfig(**MOE, num_local_experts=4), transformers.MixtralForCausalLM),
    "qwen2_moe": lambda: (transformers.Qwen2MoeConfig(**MOE, num_experts=4, moe_intermediate_size=32,
                                                      shared_expert_intermediate_size=64),
                          transformers.Qwen2MoeForCausalLM),
}
ROUTERS = {"mixtral": ("mlp.gate",), "qwen2_moe": ("mlp.gate", "mlp.shared_expert_gate")}


def build(family: str, seed: int = 0):
    """The tiny random model of ``family``, in eval mode, its weights drawn from ``seed``."""
    import torch

    torch.manual_seed(seed)
    config, model_class = ZOO[family]()
    return model_class(config).eval()


def linear_weights(model) -> dict[str, int]:
    """Report name -> element count of every linear weight: Linear and Conv1D modules,
    routers kept as a bare weight (Mixtral's ``mlp.gate``), and each expert of a 3-D
    expert weight (``<parameter>.<e>``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    for name, module in model.named_modules():
        if name.endswith(".mlp.gate") and not isinstance(module, torch.nn.Linear):
            sizes[name] = module.weight.numel()
    for name, p in model.named_parameters():
        if ".experts." in name and p.dim() == 3:
            sizes.update({f"{name}.{e}": p[e].numel() for e in range(p.shape[0])})
    return sizes
