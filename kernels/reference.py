"""Torch reference for every wina-fx kernel.

These functions define what the sparse linear computes; the Triton kernels in this
package must match them, and the CPU path of the custom ops calls them directly.

Notation: x is (..., K) activations, weight is (N, K) as in ``torch.nn.Linear``,
score is (K,) per-input-channel weights of the importance |x_i| * score_i
(WINA: column L2 norms of the weight; TEAL: ones).
"""
from __future__ import annotations

import torch


def importance(x: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """|x_i| * score_i in float32, the quantity every keep rule ranks."""
    return x.abs().float() * score.float()


def topk_mask(x: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping, per token (last dim), the k channels of largest importance."""
    num_channels = x.shape[-1]
    if k >= num_channels:
        return torch.ones_like(x, dtype=torch.bool)
    mask = torch.zeros_like(x, dtype=torch.bool)
    if k <= 0:
        return mask
    # unsorted: the mask needs the set, and sorting it cost a second kernel per linear on CUDA
    # (radixSortKVInPlace beside gatherTopK, about as long: benchmarks/NOTES.md, session 8)
    kept = importance(x, score).topk(k, dim=-1, sorted=False).indices
    return mask.scatter_(-1, kept, True)


def threshold_mask(x: torch.Tensor, score: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean mask keeping the channels whose importance is strictly above threshold."""
    return importance(x, score) > threshold


def zero_dropped(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with the channels ``keep`` drops zeroed (``where``, not a product: a dropped NaN or
    inf never reaches y)."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mask: torch.Tensor
) -> torch.Tensor:
    """y = W (x * mask) + b: the dense linear on the kept input channels only."""
    return torch.nn.functional.linear(x * mask.to(x.dtype), weight, bias)


def topk_linear(x, weight, bias, score, k: int):
    return masked_linear(x, weight, bias, topk_mask(x, score, k))


def threshold_linear(x, weight, bias, score, threshold: float):
    return masked_linear(x, weight, bias, threshold_mask(x, score, threshold))


def threshold_linear_group(x, weight, bias, scores, thresholds, sizes):
    """Linears sharing the input x, stacked: weight (sum(sizes), K) holds their weights one
    under the other, scores (G, K) and thresholds (G,) their keep rules.  Returns their
    outputs side by side, what ``torch.cat([threshold_linear(...) for each], -1)`` gives."""
    outs, start = [], 0
    for score, threshold, size in zip(scores, thresholds, sizes):
        b = None if bias is None else bias[start:start + size]
        outs.append(threshold_linear(x, weight[start:start + size], b, score, threshold))
        start += size
    return torch.cat(outs, dim=-1)


def expert_of_rows(rows: str, value: torch.Tensor, x: torch.Tensor, experts: int) -> torch.Tensor:
    """The expert of each row of an expert op's input x (S, K): ``rows`` "ids" (``value``
    is that already) or "offsets" (rows sorted by expert, ``value`` the cumulative row
    counts per expert, as grouped_mm's ``offs``; rows past the last offset belong to no
    expert and get E - 1: the op never reads them)."""
    if rows == "ids":
        return value.reshape(-1).long()
    positions = torch.arange(x.shape[0], device=value.device, dtype=value.dtype)
    return torch.searchsorted(value, positions, right=True).clamp(max=experts - 1)


def expert_keep_mask(x: torch.Tensor, expert: torch.Tensor, scores: torch.Tensor, keep: torch.Tensor,
                     topk: bool) -> torch.Tensor:
    """Keep mask of the rows x (S, K) of an expert op, each row ranked by the score of its
    expert (``expert`` (S,), ``scores`` (E, K)).  ``keep`` (E,): per expert the count of
    channels kept per row (``topk``: exactly that many, ties by lowest index) or the
    threshold that importance must exceed."""
    imp = importance(x, scores[expert])
    if not topk:
        return imp > keep[expert].unsqueeze(-1)
    order = imp.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1], device=x.device).expand_as(order))
    return rank < keep[expert].unsqueeze(-1)


def expert_threshold_linear(x, expert, weight_t, scores, thresholds):
    """Rows x (S, K) each through the threshold linear of its expert e = expert[s]:
    (x[s] * m_s) @ weight_t[e], weight_t (E, K, N), m_s keeping |x[s, i]| * scores[e, i] >
    thresholds[e].  Returns (S, N)."""
    keep = expert_keep_mask(x, expert, scores, thresholds, topk=False)
    return torch.bmm(zero_dropped(x, keep).unsqueeze(1), weight_t[expert].to(x.dtype)).squeeze(1)
