"""R-Sparse's graph form: a linear split into its kept input channels plus a low-rank
correction for the channels it drops.

    y = W x + b   becomes   y = W (x * m) + b + ((x * (1 - m)) V_r S_r) U_r^T

with W = U S V^T and the keep mask m a rule on |x_i| * scale_i (top k per token, or above a
threshold: a ``KeepRule``). V_r S_r (K, r) and U_r^T (r, N) are
constants of the graph (``add_constant``); the user's parameters are untouched. The kept
part stays an ordinary linear on x * m (the gate pass then makes it the sparse op with
``Gate(ones, KeepRule(threshold=0.0))``, which skips the zeroed channels); the correction is two small
matmuls.

Invariant: only the chosen linear's input edge changes (it reads where(m, x, 0) instead of
x) and its users read the corrected sum instead of it; every other node is left as it was.
With a mask that keeps every channel, or with r = rank(W), the graph computes what it
computed before (up to rounding).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .find_linears import LinearSite
from .graph_utils import add_constant
from .keep_rule import KeepRule


@dataclasses.dataclass
class LowRankSplit:
    """Keep rule on |x_i| * score_i and the rank-r factors of W."""

    score: torch.Tensor  # (K,)
    down: torch.Tensor  # (K, r) = V_r S_r
    up: torch.Tensor  # (r, N) = U_r^T
    rule: KeepRule

    def __post_init__(self):
        if self.down.shape[1] != self.up.shape[0]:
            raise ValueError(f"low-rank factors disagree on the rank: {tuple(self.down.shape)} and {tuple(self.up.shape)}")

    @property
    def rank(self) -> int:
        return self.up.shape[0]


def split_low_rank(gm: fx.GraphModule, splits: dict[int, LowRankSplit], sites: list[LinearSite]) -> dict[int, fx.Node]:
    """Rewrite ``sites[i]`` for each i in ``splits`` (``gm`` changes in place); return {i: the
    node of its kept part x * m}, the input the gate pass then reads."""
    inputs = {}
    for index, split in splits.items():
        site = sites[index]
        if site.problem is not None:
            raise ValueError(f"cannot split {site.name}: {site.problem}")
        node, x = site.node, site.input
        device = site.weight.device
        score = add_constant(gm, "wina_rsparse_score", split.score.to(device), before=node)
        with gm.graph.inserting_before(node):
            mask = split.rule.mask_node(gm.graph, x, score)
            kept = gm.graph.call_function(torch.where, (mask, x, 0.0))
        node.replace_input_with(x, kept)
        inputs[index] = kept
        if split.rank == 0:
            continue
        dtype = site.weight.dtype
        down = add_constant(gm, "wina_rsparse_vs", split.down.to(device, dtype), before=node)
        up = add_constant(gm, "wina_rsparse_ut", split.up.to(device, dtype), before=node)
        with gm.graph.inserting_before(node):
            dropped = gm.graph.call_function(torch.where, (mask, 0.0, x))
            low = gm.graph.call_function(torch.matmul, (dropped, down))
            correction = gm.graph.call_function(torch.matmul, (low, up))
        with gm.graph.inserting_after(node):
            total = gm.graph.call_function(torch.add, (node, correction))
        node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    gm.graph.lint()
    gm.recompile()
    return inputs
