"""The wina sparse-linear custom ops (``torch.ops.wina.*``).

Each op has a torch implementation for every device (``kernels/reference.py``) and a
fake implementation so that dynamo, AOTAutograd and Inductor can trace it. A CUDA
implementation backed by Triton plugs in with ``register_kernel("cuda", ...)``.
"""
from __future__ import annotations

import torch
from torch import Tensor

from wina_fx.kernels import reference


@torch.library.custom_op("wina::topk_linear", mutates_args=())
def topk_linear(x: Tensor, weight: Tensor, bias: Tensor | None, score: Tensor, k: int) -> Tensor:
    """y = W (x * m) + b, m keeping per token the k channels of largest |x_i| * score_i."""
    return reference.topk_linear(x, weight, bias, score, k)


@torch.library.custom_op("wina::threshold_linear", mutates_args=())
def threshold_linear(
    x: Tensor, weight: Tensor, bias: Tensor | None, score: Tensor, threshold: float
) -> Tensor:
    """y = W (x * m) + b, m keeping the channels with |x_i| * score_i > threshold."""
    return reference.threshold_linear(x, weight, bias, score, threshold)


@torch.library.custom_op("wina::count_kept", mutates_args=("counts",))
def count_kept(counts: Tensor, slot: int, x: Tensor, score: Tensor, k: int, threshold: float) -> None:
    """Add to counts[slot] the (kept, seen) channel counts of one sparse linear's input.

    k >= 0 selects top-k, k < 0 the threshold rule; the mask is the one the linear uses.
    """
    if k >= 0:
        mask = reference.topk_mask(x, score, k)
    else:
        mask = reference.threshold_mask(x, score, threshold)
    counts[slot, 0] += mask.sum()
    counts[slot, 1] += mask.numel()


@topk_linear.register_fake
def _(x, weight, bias, score, k):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@threshold_linear.register_fake
def _(x, weight, bias, score, threshold):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@count_kept.register_fake
def _(counts, slot, x, score, k, threshold):
    return None
