"""The keep rule every gate of wina-fx applies: which input channels a linear keeps.

A rule keeps, per token, the ``k`` channels of largest importance (top-k), or every channel
whose importance is strictly above ``threshold`` (calibrated).  The importance is
|v_i| * score_i for the tensor v the rule reads (a linear's input; CATS: the activated gate)
and a (K,) score (WINA: column norms; TEAL, CATS: ones).  ``sparsity``, when known, is the
share of channels the threshold was calibrated to drop; it only picks a kernel.
``dense_prefix``: over an input of T positions, the first T - int((1 - share) T) keep every
channel (WINA's and TEAL's evaluation code leaves the first 1 % of a sequence dense).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from wina_fx.kernels import reference


@dataclasses.dataclass(frozen=True)
class KeepRule:
    k: int | None = None
    threshold: float | None = None
    sparsity: float | None = None
    dense_prefix: float = 0.0  # share of each sequence's first positions kept whole (3-D inputs)

    def __post_init__(self):
        if (self.k is None) == (self.threshold is None):
            raise ValueError(f"a keep rule needs exactly one of k and threshold, got k={self.k!r}, "
                             f"threshold={self.threshold!r}")

    def mask(self, v: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The boolean keep mask of ``v`` (..., K)."""
        if self.k is not None:
            return reference.topk_mask(v, score, self.k)
        return reference.threshold_mask(v, score, self.threshold)

    def mask_node(self, graph: fx.Graph, v: fx.Node, score: fx.Node) -> fx.Node:
        """A node computing ``mask(v, score)`` in plain torch ops (Inductor fuses them)."""
        if self.k is not None:
            return graph.call_function(reference.topk_mask, (v, score, int(self.k)))
        return graph.call_function(reference.threshold_mask, (v, score, float(self.threshold)))
