"""Merge the sparse linears that read the same input into one grouped op.

q/k/v read the same normed hidden state, and so do gate and up: each runs its own
kernel launch, with its own ramp-up and tail, although they walk the same x.  This pass
replaces up to ``MAX_GROUP`` such ``wina::threshold_linear`` nodes by one
``wina::threshold_linear_group`` over their transposed weights side by side, followed
by one slice per linear.

Invariant: every merged linear keeps its own keep rule (its score row and threshold)
and its own weight and bias, so each slice computes W_g (x * m_g) + b_g as the node it
replaces did, up to the order of the float sums.  Nodes of other kinds, top-k linears,
and linears whose weight, score or bias is not a constant of the graph are left as they
are.  The grouped weight is a view of the members' weights when they are stored side by
side in one buffer (``passes/weight_layout.py`` arranges that); otherwise a new buffer of
the graph holding a copy.  Each member's transposed weight node is dropped as soon as
nothing reads it (a copy among them is the graph's own, never the user's parameter).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import wina_fx.ops  # noqa: F401  (registers torch.ops.wina)

from .graph_utils import add_constant
from .weight_layout import MAX_SIDE_BY_SIDE, side_by_side

MAX_GROUP = MAX_SIDE_BY_SIDE  # the kernel's segment table: q/k/v


@dataclasses.dataclass
class _Member:
    node: fx.Node
    weight_t: torch.Tensor  # (K, N_g)
    bias: torch.Tensor | None
    score: torch.Tensor  # (K,)
    threshold: float
    sparsity_hint: float


def group_sibling_linears(gm: fx.GraphModule, example_inputs=()) -> list[list[fx.Node]]:
    """Merge ``wina::threshold_linear`` nodes sharing their input, up to MAX_GROUP at a time,
    in graph order. Returns the groups made (the replaced nodes, already erased).

    ``example_inputs``: the real values of the graph's placeholders, through which a bias
    lifted to a graph input is read (dynamo lifts parameters)."""
    values = _ConstantValues(gm, example_inputs)
    siblings: dict[fx.Node, list[_Member]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.wina.threshold_linear.default:
            member = _member(node, values)
            if member is not None:
                siblings.setdefault(node.args[0], []).append(member)
    groups = []
    for members in siblings.values():
        for start in range(0, len(members), MAX_GROUP):
            chunk = members[start:start + MAX_GROUP]
            if len(chunk) > 1 and _compatible(chunk):
                _merge(gm, chunk)
                groups.append([m.node for m in chunk])
    if groups:
        gm.graph.lint()
        gm.recompile()
    return groups


class _ConstantValues:
    """The real tensor behind a node, when it is a constant of the graph: a buffer or
    parameter (get_attr), a lifted parameter (placeholder), or ``.t()`` of one."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.inputs = {n: v for n, v in zip(placeholders, example_inputs) if isinstance(v, torch.Tensor)}

    def __call__(self, node) -> torch.Tensor | None:
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr":
            value = self.gm
            for part in node.target.split("."):
                value = getattr(value, part, None)
            return value if isinstance(value, torch.Tensor) else None
        if node.op == "placeholder":
            return self.inputs.get(node)
        if _is_transpose(node):
            value = self(node.args[0])
            return None if value is None else value.t()
        return None


def _member(node: fx.Node, values: _ConstantValues) -> _Member | None:
    _x, weight_t_node, bias_node, score_node, threshold, *hint = node.args
    weight_t, score = values(weight_t_node), values(score_node)
    bias = values(bias_node) if bias_node is not None else None
    if weight_t is None or score is None or (bias_node is not None and bias is None):
        return None
    return _Member(node, weight_t.detach(), None if bias is None else bias.detach(), score, float(threshold),
                   float(hint[0]) if hint else 0.0)


def _compatible(chunk: list[_Member]) -> bool:
    first = chunk[0].weight_t
    return all(m.weight_t.shape[0] == first.shape[0] and m.weight_t.dtype == first.dtype
               and m.weight_t.device == first.device for m in chunk)


def _merge(gm: fx.GraphModule, chunk: list[_Member]) -> None:
    first = chunk[0].node  # earliest in graph order: x is defined before it
    # The members' weights stored side by side (passes/weight_layout.py): read in place.
    weight_t = side_by_side([m.weight_t for m in chunk])
    if weight_t is None:
        weight_t = torch.cat([m.weight_t for m in chunk], dim=1).contiguous()
    sizes = [m.weight_t.shape[1] for m in chunk]
    bias = None
    if any(m.bias is not None for m in chunk):
        bias = torch.cat([m.bias if m.bias is not None else m.weight_t.new_zeros(size)
                          for m, size in zip(chunk, sizes)])
    scores = torch.stack([m.score.float() for m in chunk]).to(weight_t.device)
    weight_node = add_constant(gm, "wina_group_weight_t", weight_t, before=first)
    bias_node = add_constant(gm, "wina_group_bias", bias, before=first) if bias is not None else None
    scores_node = add_constant(gm, "wina_group_scores", scores, before=first)
    with gm.graph.inserting_before(first):
        grouped = gm.graph.call_function(
            torch.ops.wina.threshold_linear_group.default,
            (first.args[0], weight_node, bias_node, scores_node, [m.threshold for m in chunk], sizes,
             min(m.sparsity_hint for m in chunk)))
    start = 0
    for member, size in zip(chunk, sizes):
        with gm.graph.inserting_after(grouped):
            piece = gm.graph.call_function(torch.ops.aten.slice.Tensor, (grouped, -1, start, start + size))
        piece.meta.update(member.node.meta)
        start += size
        old_weight = member.node.args[1]
        member.node.replace_all_uses_with(piece)
        gm.graph.erase_node(member.node)
        _drop_if_unused(gm, old_weight)


def _drop_if_unused(gm: fx.GraphModule, node: fx.Node) -> None:
    """Erase an orphaned transposed-weight node (and its buffer: the graph's own copy)."""
    if node.users:
        return
    if node.op == "get_attr":
        target = node.target
        gm.graph.erase_node(node)
        if target.startswith("wina_") and not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
            delattr(gm, target)
            getattr(gm, "_param_name_to_source", {}).pop(target, None)
    elif _is_transpose(node):
        gm.graph.erase_node(node)


def _is_transpose(node: fx.Node) -> bool:
    """``w.t()``: a method call in a dynamo graph, ``aten.t`` in a traced one."""
    return len(node.args) == 1 and ((node.op == "call_method" and node.target == "t") or
                                    (node.op == "call_function" and node.target is torch.ops.aten.t.default))
