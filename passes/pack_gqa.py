"""One-token grouped-query attention over the K/V heads as stored, not repeated.

transformers' sdpa attention, traced by dynamo, repeats each K/V head for the G query heads
that share it (``repeat_kv``: ``k[:, :, None].expand(B, Hkv, G, L, D).reshape(B, Hkv G, L, D)``)
before ``scaled_dot_product_attention``.  Compiled, that is a copy of the whole K and V cache
per layer and step: on the H200 decode step, four small kernels around the attention kernel.
With one query token the copy is not needed: the G query heads of a group can be read as G
query positions of one head, ``q.reshape(B, Hkv, G, D)``, attending to the K/V head itself
(as transformers does outside of torch.compile, ``pack_gqa``).

Invariant: each rewritten attention computes, for every query head h, softmax(q_h k^T s + mask)
v over the K/V head h // G that repeat_kv gave it, as before (up to the float order of the
attention kernel).  It is rewritten only where that is exact: one query position, K and V
repeated by the same G from the unrepeated heads, a mask (if any) shared by every head and
query (head and query dims of size 1), no causal flag, no dropout, no ``enable_gqa``.  Every
other attention is left as traced; those reading repeated K/V are counted with the reason.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

SDPA = (torch._C._nn.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention)
_FULL = slice(None, None, None)


def pack_grouped_query_attention(gm: fx.GraphModule) -> tuple[int, dict[str, int]]:
    """Rewrite the one-token attentions over repeated K/V heads (see the module docstring).
    Returns (attentions rewritten, {reason: count} of those over repeated K/V left as traced)."""
    packed, left = 0, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA:
            continue
        args = _sdpa_arguments(node)
        if args is None:
            continue
        key, value = _unrepeated(args["key"]), _unrepeated(args["value"])
        if key is None or value is None:
            continue
        reason = _why_not(args, key, value)
        if reason is not None:
            left[reason] = left.get(reason, 0) + 1
            continue
        _rewrite(gm, node, args, key, value)
        packed += 1
    if packed:
        gm.graph.lint()
        gm.recompile()
    return packed, left


def _sdpa_arguments(node: fx.Node) -> dict | None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    if len(node.args) > len(names):
        return None
    args = dict(zip(names, node.args))
    args.update(node.kwargs)
    if set(args) - set(names):
        return None
    return args


class _Repeated:
    """K or V repeated by repeat_kv: the unrepeated node (B, Hkv, L, D), the repeat G, and the
    chain of nodes repeating it (last first)."""

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
        index = inserted.args[1]
        if index != (_FULL, _FULL, None, _FULL, _FULL) and index != (_FULL, _FULL, None):
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
    """Why this attention over repeated K/V cannot be packed exactly, or None."""
    query = _shape(args["query"])
    if query is None or len(query) != 4:
        return "query shape unknown"
    if key.groups != value.groups:
        return "K and V repeated by different factors"
    if not all(isinstance(s, int) for s in query[1:]) or query[2] != 1:
        return "more than one query position (prefill)"
    if args.get("is_causal", False) is not False:
        return "is_causal set"
    if args.get("dropout_p", 0.0) != 0.0:
        return "dropout"
    if args.get("enable_gqa", False) is not False:
        return "enable_gqa already set"
    mask = args.get("attn_mask")
    if mask is not None:
        shape = _shape(mask)
        if shape is None or len(shape) > 4:
            return "mask shape unknown"
        if any(size != 1 for size in shape[-3:-1]):
            return "mask differs across heads or queries"
    return None


def _rewrite(gm: fx.GraphModule, node: fx.Node, args: dict, key: _Repeated, value: _Repeated) -> None:
    _, heads, _, dim = _shape(args["query"])
    out_dim = _shape(value.source)[-1]
    kv_heads = heads // key.groups
    graph = gm.graph
    with graph.inserting_before(node):
        query = graph.call_method("reshape", (args["query"], -1, kv_heads, key.groups, dim))
        kwargs = {k: v for k, v in args.items() if k not in ("query", "key", "value")}
        attention = graph.call_function(node.target, (query, key.source, value.source), kwargs)
        out = graph.call_method("reshape", (attention, -1, heads, 1, out_dim))
    out.meta.update(node.meta)
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    for repeated in (key, value):  # the repeat chains, where nothing else reads them
        for link in repeated.chain:
            if not link.users:
                graph.erase_node(link)
