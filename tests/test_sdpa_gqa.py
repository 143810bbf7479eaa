"""passes/sdpa_gqa.py: one-token grouped-query attention by sdpa's enable_gqa, over the K/V heads as stored."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wina_fx
from wina_fx.passes.sdpa_gqa import attend_grouped_heads
from tiny_models import compiled_decode_steps, tiny_model
from transformers.integrations.sdpa_attention import repeat_kv

SDPA = torch.nn.functional.scaled_dot_product_attention


def capture(fn, *inputs):
    """(the dynamo graph of fn, with its example values; the graph's inputs)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    assert len(graphs) == 1
    return graphs[0]


def attention(mask_kind: str, groups: int, causal: bool = False):
    """transformers' sdpa attention over repeat_kv, as it is traced under torch.compile."""

    def fn(q, k, v, mask):
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        return SDPA(q, k, v, attn_mask=None if mask_kind == "none" else mask, dropout_p=0.0, scale=0.3,
                    is_causal=causal)

    return fn


def inputs(batch, kv_heads, groups, queries, length, dim, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * groups, queries, dim, generator=g)
    k = torch.randn(batch, kv_heads, length, dim, generator=g)
    v = torch.randn(batch, kv_heads, length, dim + 3, generator=g)
    shape = {"none": (1,), "shared": (batch, 1, queries, length), "float": (1, 1, queries, length),
             "per_head": (batch, kv_heads * groups, queries, length)}[mask_kind]
    mask = torch.rand(shape, generator=g) > 0.3
    if mask_kind != "none":
        mask[..., 0] = True  # every query attends somewhere
    if mask_kind == "float":
        mask = torch.where(mask, 0.0, -torch.inf)
    return q, k, v, mask


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 3), kv_heads=st.integers(1, 3), groups=st.integers(2, 4), length=st.integers(1, 9),
       dim=st.sampled_from([4, 8]), mask_kind=st.sampled_from(["none", "shared", "float", "per_head"]),
       causal=st.booleans())
def test_grouped_attention_is_the_repeated_one(batch, kv_heads, groups, length, dim, mask_kind, causal):
    """One query token, K/V repeated for G query heads each: the rewritten graph reads K and V
    unrepeated (sdpa's enable_gqa) and gives the same output, for any mask and causal flag."""
    args = inputs(batch, kv_heads, groups, 1, length, dim, mask_kind)
    fn = attention(mask_kind if not causal else "none", groups, causal=causal)
    gm, graph_inputs = capture(fn, *args)
    expected = gm(*graph_inputs)[0]
    assert attend_grouped_heads(gm) == (1, {})
    assert not any(n.op == "call_method" and n.target == "expand" for n in gm.graph.nodes)  # no repeat left
    assert [n.kwargs.get("enable_gqa") for n in gm.graph.nodes if n.op == "call_function"
            and "scaled_dot_product_attention" in str(n.target)] == [True]
    torch.testing.assert_close(gm(*graph_inputs)[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(expected, fn(*args), rtol=1e-5, atol=1e-5)


def test_prefill_is_left_and_counted():
    args = inputs(2, 2, 3, 3, 5, 8, "shared")
    gm, _ = capture(attention("shared", 3), *args)
    before = gm.code
    assert attend_grouped_heads(gm) == (0, {"more than one query position (prefill)": 1})
    assert gm.code == before


def test_k_and_v_repeated_differently_are_left_and_counted():
    q, k, v = torch.randn(1, 6, 1, 8), torch.randn(1, 3, 5, 8), torch.randn(1, 2, 5, 8)
    gm, _ = capture(lambda q, k, v: SDPA(q, repeat_kv(k, 2), repeat_kv(v, 3)), q, k, v)
    assert attend_grouped_heads(gm) == (0, {"K and V repeated by different factors": 1})


def test_attention_without_repeated_heads_is_not_touched():
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 6, 8), torch.randn(1, 4, 6, 8)
    gm, _ = capture(lambda q, k, v: SDPA(q, k, v), q, k, v)
    assert attend_grouped_heads(gm) == (0, {})


@torch.no_grad()
@pytest.mark.parametrize("device,inductor", [
    ("cpu", False), ("cpu", True),
    pytest.param("cuda", True, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
], ids=["cpu-fx", "cpu-inductor", "cuda"])
def test_decode_steps_of_a_grouped_query_llama(device, inductor):
    """A tiny Llama with 2 K/V heads for 4 query heads, decoding with a static cache through
    backend="wina" at 50 %: with option sdpa_gqa (default) the report names the rewritten
    attentions, and the logits are those with sdpa_gqa=False, step after step."""
    model, ids = tiny_model("llama", seed=3, kv_heads=2)
    model = model.to(device)
    model.config._attn_implementation = "sdpa"
    prompt = ids[:1, :6].to(device)
    logits = {}
    for rewrite in (True, False):
        options = {"sparsity": 0.5, "inductor": inductor, "sdpa_gqa": rewrite}
        logits[rewrite], notes = compiled_decode_steps(model, prompt, options, cache_len=12)
        rewritten = [n for n in notes if n.startswith("attention: 2 one-token")]
        assert bool(rewritten) == rewrite, notes
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-4)


def test_sdpa_gqa_option_is_checked():
    with pytest.raises(ValueError, match="option 'sdpa_gqa' must be True or False"):
        wina_fx.WinaConfig.from_options({"sdpa_gqa": "yes"})
