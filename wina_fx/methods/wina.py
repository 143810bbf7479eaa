"""WINA (arXiv 2505.19427): keep the input channels of largest |x_i| * ||W[:, i]||_2."""
from __future__ import annotations

import torch

from .base import Method, column_norms


class Wina(Method):
    """Weight-informed: a channel's activation weighed by the norm of the weight column it
    multiplies, which bounds the output error it causes when dropped (tight for W with
    orthogonal columns; see option ``orthogonalize``)."""

    name = "wina"
    allocated = True

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return column_norms(weight)
