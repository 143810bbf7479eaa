"""WINA (arXiv 2505.19427): keep the input channels of largest |x_i| * ||W[:, i]||_2."""
from __future__ import annotations

import torch

from wina_fx.passes.orthogonalize import REFERENCE_SOURCES

from .base import DEFAULT_RECIPE, Method, Recipe, column_norms

# microsoft/wina (wina/mlp.py, wina/self_attn.py, utils/tensor_transform.py): Q from the SVD
# of k_proj for the attention input and of gate_proj for the MLP input, shortcut rotations on
# the residual path ("full"); column norms only on those two (and their fused forms), |x|
# elsewhere; every linear its own mask; the first 1 % of each sequence's positions dense.
PAPER = Recipe("paper", transform=("full", REFERENCE_SOURCES),
               scored_kinds=("k_proj", "qkv_proj", "gate_proj", "gate_up_proj"), dense_prefix=0.01)


class Wina(Method):
    """Weight-informed: a channel's activation weighed by the norm of the weight column it
    multiplies, which bounds the output error it causes when dropped (tight for W with
    orthogonal columns; see option ``orthogonalize``)."""

    name = "wina"
    score_label = "column norms"
    recipes = {"default": DEFAULT_RECIPE, "paper": PAPER}
    allocated = True

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return column_norms(weight)
