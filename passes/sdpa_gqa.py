"""One-token grouped-query attention by sdpa's own ``enable_gqa``, over the K/V heads as stored.

transformers' sdpa attention, traced by dynamo with a mask, repeats each K/V head for the G
query heads that share it (``repeat_kv``: ``k[:, :, None].expand(B, Hkv, G, L, D).reshape(B,
Hkv G, L, D)``) before ``scaled_dot_product_attention``.  Compiled, that is a copy of the whole K
and V cache per layer and step.  ``enable_gqa=True`` asks sdpa for the same attention (query
head h reads K/V head h // G) without the copy.  With a mask, sdpa takes its math path for
that, which Inductor compiles into kernels of its own that read each K/V head in place.
Measured on an H200 (Llama-3-8B's 32 over 8 heads, bf16, under Inductor;
``benchmarks/attention_decode.py``): 7.5 against 10.0 us a layer with 169 cached positions, 13.9
against 50.4 with 4096.  (Packing the G query heads of a group as G query positions of one
head, as transformers does outside torch.compile, measured slower than the copy: 11.5 and
86.3 us.)  With more query positions the math path is not what one wants (prefill: flash
attention), hence one query position only.

Invariant: each rewritten attention reads the same query, mask, scale, dropout and causal
flag, and for every query head the K/V head that repeat_kv gave it, as before (up to the float
order of the attention kernel).  Only attentions of one query position are rewritten (decode,
what was measured); K and V must be repeated by the same G.  Every other attention over
repeated K/V is left as traced and counted with the reason.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_FULL = slice(None, None, None)


def attend_grouped_heads(gm: fx.GraphModule) -> tuple[int, dict[str, int]]:
    """Rewrite the one-token attentions over repeated K/V heads (see the module docstring).
    Returns (attentions rewritten, {reason: count} of those over repeated K/V left as traced)."""
    rewritten, left = 0, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA or len(node.args) > len(_ARGUMENTS):
            continue
        args = {**dict(zip(_ARGUMENTS, node.args)), **node.kwargs}
        key, value = _unrepeated(args.get("key")), _unrepeated(args.get("value"))
        if key is None or value is None:
            continue
        reason = _why_not(args, key, value)
        if reason is not None:
            left[reason] = left.get(reason, 0) + 1
            continue
        _rewrite(gm, node, args, key, value)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten, left


class _Repeated:
    """K or V repeated by repeat_kv: the unrepeated node (B, Hkv, L, D), the repeat G, and the
    nodes repeating it (last first)."""

    def __init__(self, source: fx.Node, groups: int, chain: list[fx.Node]):
        self.source, self.groups, self.chain = source, groups, chain


def _shape(node) -> tuple | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _unrepeated(node) -> _Repeated | None:
    """``source[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv G, L, D)`` (or with
    ``unsqueeze(2)`` / ``view``): the source and G; else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_method" and node.target in ("reshape", "view")):
        return None
    expanded = node.args[0]
    if not (isinstance(expanded, fx.Node) and expanded.op == "call_method" and expanded.target == "expand"):
        return None
    inserted = expanded.args[0]
    if not isinstance(inserted, fx.Node):
        return None
    if inserted.op == "call_function" and inserted.target is operator.getitem:
        if inserted.args[1] not in ((_FULL, _FULL, None, _FULL, _FULL), (_FULL, _FULL, None)):
            return None
    elif not (inserted.op == "call_method" and inserted.target == "unsqueeze" and inserted.args[1:] == (2,)):
        return None
    source = inserted.args[0]
    shapes = _shape(source), _shape(expanded), _shape(node)
    if any(s is None or len(s) != n for s, n in zip(shapes, (4, 5, 4))):
        return None
    (b, hkv, length, d), (_, _, groups, _, _), out = shapes
    if shapes[1] != (b, hkv, groups, length, d) or out != (b, hkv * groups, length, d):
        return None
    return _Repeated(source, groups, [node, expanded, inserted])


def _why_not(args: dict, key: _Repeated, value: _Repeated) -> str | None:
    """Why this attention over repeated K/V is left as traced, or None."""
    query = _shape(args["query"])
    if query is None or len(query) != 4:
        return "query shape unknown"
    if query[2] != 1:
        return "more than one query position (prefill)"
    if key.groups != value.groups:
        return "K and V repeated by different factors"
    if args.get("enable_gqa", False) is not False:
        return "enable_gqa already set"
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, args: dict, key: _Repeated, value: _Repeated) -> None:
    graph = gm.graph
    kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value")}
    with graph.inserting_before(node):
        attention = graph.call_function(node.target, (args["query"], key.source, value.source),
                                        {**kwargs, "enable_gqa": True})
    attention.meta.update(node.meta)
    node.replace_all_uses_with(attention)
    graph.erase_node(node)
    for repeated in (key, value):  # the repeat chains, where nothing else reads them
        for link in repeated.chain:
            if not link.users:
                graph.erase_node(link)
