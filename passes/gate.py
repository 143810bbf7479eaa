"""Replace chosen linears with the wina sparse-linear custom ops.

Invariant: every node not named in ``gates`` is left as it was, and each replaced
linear computes W (x * m) + b with the same x, W and b as before, m being the keep
mask of its gate. With a gate that keeps every channel the graph computes what it
computed before.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import wina_fx.ops  # noqa: F401  (registers torch.ops.wina)
from wina_fx import sharded

from .find_linears import LinearSite
from .graph_utils import add_constant, shared_constant
from .keep_rule import KeepRule
from . import weight_layout


@dataclasses.dataclass
class Gate:
    """How one linear keeps channels: ``rule`` on |x_i| * score_i."""

    score: torch.Tensor  # (K,) float32
    rule: KeepRule


def gate_linears(
    gm: fx.GraphModule,
    gates: dict[int, Gate],
    sites: list[LinearSite],
    counts: torch.Tensor | None = None,
    inputs: dict[int, fx.Node] | None = None,
) -> dict[int, fx.Node]:
    """Rewrite ``sites[i]`` for each i in ``gates`` (``gm`` changes in place); return {i: its
    sparse op node}.  ``inputs`` overrides the input node of some linears (what a rewrite
    that masked them returned); the sites themselves are not changed.

    Score vectors become buffers of ``gm``. When ``counts`` (num_sites, 2) is given, a
    ``wina::count_kept`` op after each rewritten linear adds its kept and seen channel
    counts to ``counts[i]``; ``counts`` is registered as a buffer so that compilers see
    the mutation.
    """
    counts_node = None if counts is None else shared_constant(gm, "wina_counts", counts)
    replaced: dict[fx.Node, fx.Node] = {}  # linear -> its sparse op (a linear may read another's output)
    for index, gate in gates.items():
        site = sites[index]
        x = (inputs or {}).get(index, site.input)
        x = replaced.get(x, x)
        if site.problem is not None:
            raise ValueError(f"cannot gate {site.name}: {site.problem}")
        node = site.node
        score_node = add_constant(gm, "wina_score", gate.score.to(site.weight.device), before=node)
        weight_node, bias_node = site.weight_node, site.bias_node
        if node.op == "call_module":  # an nn.Linear left as a module call
            with gm.graph.inserting_before(node):
                weight_node = gm.graph.get_attr(f"{node.target}.weight")
                if gm.get_submodule(node.target).bias is not None:
                    bias_node = gm.graph.get_attr(f"{node.target}.bias")
        weight_t_node = _transposed_weight(gm, site, weight_node, before=node)
        with gm.graph.inserting_before(node):
            rule = gate.rule
            if rule.k is not None:
                op, args = torch.ops.wina.topk_linear.default, (_shard_k(site, rule.k),)
            else:
                op, args = torch.ops.wina.threshold_linear.default, (float(rule.threshold), float(rule.sparsity or 0.0))
            sparse = gm.graph.call_function(op, (x, weight_t_node, bias_node, score_node, *args))
        sparse.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value", "val")})
        out = sparse
        if rule.dense_prefix > 0:
            with gm.graph.inserting_after(sparse):
                out = gm.graph.call_function(dense_prefix, (x, sparse, weight_t_node, bias_node, rule.dense_prefix))
            out.meta.update(sparse.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        replaced[node] = out
        if counts_node is not None:
            k = rule.k if rule.k is not None else -1
            threshold = float(rule.threshold) if rule.threshold is not None else 0.0
            with gm.graph.inserting_after(sparse):
                gm.graph.call_function(
                    torch.ops.wina.count_kept.default,
                    (counts_node, index, x, score_node, k, threshold),
                )
    gm.graph.lint()
    gm.recompile()
    return {index: replaced[sites[index].node] for index in gates}


def _shard_k(site: LinearSite, k: int) -> int:
    """Top-k of a row-parallel linear keeps k per rank's slice of the channels (sharded.py):
    the same share of its K / ranks channels as k of K."""
    if not sharded.row_parallel(site.weight):
        return k
    return max(1, round(k * sharded.local_inputs(site.weight) / site.in_features))


def dense_prefix(x: torch.Tensor, sparse: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None,
                 share: float) -> torch.Tensor:
    """``sparse`` (the sparse linear of x, (..., T, N)) with its first T - int((1 - share) T)
    positions replaced by the dense linear's: the dense prefix of a ``KeepRule``.  A 2-D x
    (flattened tokens, no positions) is left sparse."""
    if x.dim() < 3:
        return sparse
    positions = x.shape[-2]
    first = positions - int((1.0 - share) * positions)
    if first == 0:
        return sparse
    dense = torch.nn.functional.linear(x[..., :first, :], weight_t.t(), bias)
    return torch.cat([dense.to(sparse.dtype), sparse[..., first:, :]], dim=-2)


def _transposed_weight(gm: fx.GraphModule, site: LinearSite, weight_node: fx.Node, before: fx.Node) -> fx.Node:
    """A node holding W^T (K, N), the layout in which a kept channel is one contiguous row.

    A view of the user's weight wherever that serves: the torch reference reads any
    layout, and the CUDA kernels read W^T in place once ``passes/weight_layout.py`` has
    stored it so.  Only a CUDA weight still stored row-major (the backend re-lays weights
    out before it gates them, so a caller of this pass alone) gets a transposed copy as a
    constant of the graph; the user's parameter is not touched.
    """
    if site.weight_is_transposed:  # x @ W with W stored (K, N): already W^T
        return weight_node
    if weight_layout.needs_transposed_copy(site):
        return add_constant(gm, "wina_weight_t", site.weight.detach().t().contiguous(), before=before)
    with gm.graph.inserting_before(before):
        return gm.graph.call_method("t", (weight_node,))
