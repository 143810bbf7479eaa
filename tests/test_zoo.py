"""A zoo of tiny random causal LMs from ``transformers``: every linear, in whatever form the
model writes it (nn.Linear, GPT-2's Conv1D, Falcon's x @ W.T, 3-D expert weights), gets a
report row; at 50 % everything but the output head and the routers is sparse; at 0 the
compiled model is the eager one."""
import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

import wina_fx

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


def expected_rows(model) -> set[str]:
    """Every Linear / Conv1D module and every expert of every 3-D expert weight."""
    names = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    for name, p in model.named_parameters():
        if ".experts." in name and p.dim() == 3:
            names |= {f"{name}.{e}" for e in range(p.shape[0])}
    routers = [n for n, m in model.named_modules() if n.endswith(".mlp.gate") and not isinstance(m, torch.nn.Linear)]
    return names | set(routers)


@pytest.mark.parametrize("family", list(ZOO))
@torch.no_grad()
def test_zoo(family):
    torch.manual_seed(0)
    config, model_class = ZOO[family]()
    model = model_class(config).eval()
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    eager = model(ids).logits
    for sparsity in (0.0, 0.5):
        torch._dynamo.reset()
        out = torch.compile(model, backend="wina", options={"sparsity": sparsity, "inductor": False})(ids).logits
        report = wina_fx.last_report()
        if sparsity == 0:
            torch.testing.assert_close(out, eager, rtol=0, atol=0)
            continue
        rows = {r.name: r.status for r in report.rows}
        assert expected_rows(model) <= set(rows), sorted(expected_rows(model) - set(rows))
        dense = {n for n, status in rows.items() if not status.startswith("sparse")}
        routers = {n for n in rows for r in ROUTERS.get(family, ()) if n.endswith(r)}
        head = {n for n, status in rows.items() if "output head" in status}
        assert len(head) == 1 and dense == head | routers, {n: rows[n] for n in dense}
        assert all(rows[n].startswith("dense: router") for n in routers)
        assert torch.isfinite(out).all()
    torch._dynamo.reset()
