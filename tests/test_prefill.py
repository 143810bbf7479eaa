"""Option prefill='dense': multi-token steps dense, one-token decode steps sparse."""
import pytest
import torch
import transformers

import wina_fx
import wina_fx.backend
from tiny_models import masked_input_hooks, tiny_model


def _cache(model, length):
    return transformers.StaticCache(config=model.config, max_cache_len=length)


@torch.no_grad()
def test_prefill_dense_then_sparse_decode_steps(monkeypatch):
    """Prefill through the compiled model equals the dense model exactly; each decode step
    equals the eager model whose linears mask their inputs (the sparse rule) reading the
    same dense-prefilled cache; a static cache compiles prefill and decode once each."""
    model, ids = tiny_model("llama", seed=4)
    prompt = ids[:1, :9]
    calls = []
    real = wina_fx.backend.plan  # called once per backend call
    monkeypatch.setattr(wina_fx.backend, "plan", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="wina",
                                 options={"sparsity": 0.5, "prefill": "dense", "inductor": False}, dynamic=False)
        cache, ref_cache = _cache(model, 16), _cache(model, 16)
        position = torch.arange(prompt.shape[1])
        logits = compiled(prompt, past_key_values=cache, cache_position=position).logits
        report = wina_fx.last_report()
        assert not report.sparse_rows and any("prefill='dense'" in n for n in report.notes)
        assert all(r.status.startswith("dense:") for r in report.rows)
        expected = model(prompt, past_key_values=ref_cache, cache_position=position).logits
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)

        token = logits[:, -1:].argmax(-1)
        for step in range(4):
            position = position[-1:] + 1
            out = compiled(token, past_key_values=cache, cache_position=position).logits
            if step == 0:
                assert len(wina_fx.last_report().sparse_rows) == 14  # 2 layers x 7, lm_head dense
            hooks = masked_input_hooks(model, 0.5)
            ref = model(token, past_key_values=ref_cache, cache_position=position).logits
            for h in hooks:
                h.remove()
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            token = out[:, -1:].argmax(-1)
        assert len(calls) == 2  # one prefill graph, one decode graph
    finally:
        torch._dynamo.reset()


def test_prefill_option_is_checked():
    with pytest.raises(ValueError, match="option 'prefill' must be one of 'sparse', 'dense'"):
        wina_fx.WinaConfig.from_options({"prefill": "off"})


@torch.no_grad()
def test_decode_perplexity_is_the_continuation_of_a_whole_window_pass():
    """Dense: prefill + token-by-token decoding scores the continuation exactly as one
    forward over the window does; prefill='dense' only changes the prompt's step."""
    from wina_fx.eval import decode_perplexity

    model, ids = tiny_model("llama", seed=6)
    window = ids[:1, :12]
    logits = model(window).logits[:, 4:-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 5:].reshape(-1))
    assert abs(decode_perplexity(model, [window], 5) - float(nll.exp())) < 1e-4 * float(nll.exp())
    with pytest.raises(ValueError, match="prompt_len"):
        decode_perplexity(model, [window], 12)


@torch.no_grad()
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_on_the_compiled_forward(monkeypatch, cache):
    """model.generate() with its KV cache on a forward compiled by backend="wina": at
    sparsity 0 the tokens are eager's; at 50% with prefill='dense' a second generate()
    compiles nothing new (no recompilation per decode step)."""
    model, ids = tiny_model("llama", seed=2)
    model.generation_config.pad_token_id = 0
    prompt = ids[:1, :8]
    kwargs = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False,
                  **({"cache_implementation": "static"} if cache == "static" else {}))
    eager = model.generate(prompt, **kwargs)
    calls = []
    real = wina_fx.backend.plan
    monkeypatch.setattr(wina_fx.backend, "plan", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    try:
        for sparsity in (0.0, 0.5):
            torch._dynamo.reset()
            options = {"sparsity": sparsity, "prefill": "dense", "inductor": False}
            model.forward = torch.compile(type(model).forward.__get__(model), backend="wina", options=options)
            first = model.generate(prompt, **kwargs)
            compiled = len(calls)
            again = model.generate(prompt, **kwargs)
            assert len(calls) == compiled and torch.equal(first, again)
            if sparsity == 0:
                assert torch.equal(first, eager)
            del model.forward
            calls.clear()
    finally:
        torch._dynamo.reset()
