"""Tiny random-weight models of the families wina-fx must handle, built with transformers."""
import torch

FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def tiny_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 96):
    """A (model, input_ids) pair: Llama; Qwen2 (q/k/v bias); Mistral; Phi3 (fused qkv and gate_up)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    }[family]
    model = model_class(config_class(**common)).eval()
    with torch.no_grad():  # make RMSNorm scales non-trivial so that folding them matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:  # biases
                p.normal_(0, 0.1)
    input_ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))
    return model, input_ids


def logits_with_hooks(model, ids, handles) -> torch.Tensor:
    """The model's eager logits on ``ids`` with the given hooks in place; removes them after."""
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
