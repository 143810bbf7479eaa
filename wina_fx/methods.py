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
        return column_norms(weight)
    if method in ("teal", "cats"):
        return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
    raise ValueError(f"no channel scores for method {method!r}; valid: {', '.join(SCORED_METHODS)}")


def column_norms(weight: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """||W[:, i]||_2 in float32, summed over blocks of rows: never a float32 copy of the
    whole weight (for an 8B model's largest matrix that copy would be 235 MB of memory
    the compile holds only to read it once)."""
    squares = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for block in weight.detach().split(rows, dim=0):
        squares += block.float().square().sum(dim=0)
    return squares.sqrt()


def keep_count(num_channels: int, sparsity: float) -> int:
    """Channels kept per token at ``sparsity`` (top-k): round((1 - s) * K), at least 1."""
    return max(1, round((1.0 - sparsity) * num_channels))
