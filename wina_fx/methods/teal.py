"""TEAL (arXiv 2408.14690): keep the input channels of largest |x_i|."""
from __future__ import annotations

import torch

from .base import DEFAULT_RECIPE, Method, Recipe, unit_scores

# TEAL as the WINA paper ran it beside WINA (microsoft/wina): |x|, no transform, gate and
# up sharing one mask, the first 1 % of each sequence's positions dense.
PAPER = Recipe("paper", dense_prefix=0.01, shared_gate_up=True)


class Teal(Method):
    """Magnitude alone: every weight column counts the same."""

    name = "teal"
    score_label = "|x| only"
    recipes = {"default": DEFAULT_RECIPE, "paper": PAPER}
    allocated = True

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return unit_scores(weight)
