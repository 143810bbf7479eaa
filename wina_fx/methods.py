"""Per-input-channel scores of the keep rules: importance_i = |x_i| * score_i."""
from __future__ import annotations

import torch

SCORED_METHODS = ("wina", "teal", "cats", "rsparse")


def channel_scores(method: str, weight: torch.Tensor) -> torch.Tensor:
    """The (K,) float32 score vector of ``method`` for a weight of shape (N, K).

    WINA weighs each input channel by the L2 norm of the weight column it multiplies,
    ||W[:, i]||_2; TEAL ranks channels by |x_i| alone. R-Sparse scales |x_i| by
    ||(V S)[i, :]||_2 for W = U S V^T, which is the same column norm. CATS ranks the
    activated gate |act(gate(x))_i| alone, for the down projection W it feeds.
    """
    if method in ("wina", "rsparse"):
        return weight.detach().float().norm(dim=0)
    if method in ("teal", "cats"):
        return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    raise ValueError(f"no channel scores for method {method!r}; valid: {', '.join(SCORED_METHODS)}")


def keep_count(num_channels: int, sparsity: float) -> int:
    """Channels kept per token at ``sparsity`` (top-k): round((1 - s) * K), at least 1."""
    return max(1, round((1.0 - sparsity) * num_channels))
