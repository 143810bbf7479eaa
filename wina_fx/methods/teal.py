"""TEAL (arXiv 2408.14690): keep the input channels of largest |x_i|."""
from __future__ import annotations

import torch

from .base import Method, unit_scores


class Teal(Method):
    """Magnitude alone: every weight column counts the same."""

    name = "teal"
    allocated = True

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return unit_scores(weight)
