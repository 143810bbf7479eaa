"""Tiny random-weight models of the families wina-fx must handle, built with transformers."""
import torch

FAMILIES = ("llama", "qwen2", "mistral", "phi3")


def tiny_model(family: str, seed: int = 0, hidden: int = 64, layers: int = 2, vocab: int = 96, kv_heads: int = 2):
    """A (model, input_ids) pair: Llama; Qwen2 (q/k/v bias); Mistral; Phi3 (fused qkv and gate_up)."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
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


def masked_input_hooks(model, sparsity: float, skip: tuple[str, ...] = ()) -> list:
    """Eager reference of top-k WINA at ``sparsity``: a forward pre-hook on every linear
    (``nn.Linear``, GPT-2's ``Conv1D``) but ``lm_head`` masks its input by top-k on
    |x_i| * ||W[:, i]||_2, W the weight as used, (out, in), whatever its storage.  Norms
    are taken now and then fixed, as the compiled graph's are.  Linears named in ``skip``
    (routers) are left alone.  Returns the handles."""
    from transformers.pytorch_utils import Conv1D

    from wina_fx.kernels import reference
    from wina_fx.methods import channel_scores, keep_count

    hooks = []
    for name, module in model.named_modules():
        if name == "lm_head" or name in skip or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        used = module.weight.t() if isinstance(module, Conv1D) else module.weight
        score, k = channel_scores("wina", used).detach(), keep_count(used.shape[1], sparsity)
        hooks.append(module.register_forward_pre_hook(
            lambda m, args, score=score, k=k: (args[0] * reference.topk_mask(args[0], score, k).to(args[0].dtype),)))
    return hooks


@torch.no_grad()
def compiled_decode_steps(model, prompt, options: dict, steps: int = 3, cache_len: int | None = None):
    """(logits of ``steps`` greedy one-token steps stacked, the last report's notes): the prompt
    prefilled eagerly into a static cache, then each step through ``backend="wina"`` with
    ``options`` (dynamo reset first, so the graph is compiled for these options)."""
    import transformers

    import wina_fx

    torch._dynamo.reset()
    cache = transformers.StaticCache(config=model.config, max_cache_len=cache_len or prompt.shape[1] + steps + 2)
    position = torch.arange(prompt.shape[1], device=prompt.device)
    token = model(prompt, past_key_values=cache, cache_position=position).logits[:, -1:].argmax(-1)
    step = torch.compile(model, backend="wina", dynamic=False, options=options)
    logits = []
    for _ in range(steps):
        position = position[-1:] + 1
        logits.append(step(token, past_key_values=cache, cache_position=position).logits)
        token = logits[-1][:, -1:].argmax(-1)
    return torch.cat(logits), wina_fx.last_report().notes
