"""WINA's Lemma, checked by brute force: with column-orthogonal W, keeping the top-k
channels by |x_i| * ||W[:, i]|| minimises ||W x - W x_S|| over every k-subset S."""
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wina_fx.kernels.reference import topk_mask
from wina_fx.methods import channel_scores


def _column_orthogonal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    column_norms = torch.rand(k, generator=g, dtype=torch.float64) * 4 + 0.1
    return q * column_norms  # orthogonal, not orthonormal, columns


def _error(w, x, mask):
    return torch.linalg.vector_norm(w @ x - w @ (x * mask)).item()


@settings(max_examples=60, deadline=None)
@given(
    k_in=st.integers(2, 7),
    extra_rows=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_wina_topk_is_the_best_subset_and_never_worse_than_teal(k_in, extra_rows, seed, data):
    w = _column_orthogonal(k_in + extra_rows, k_in, seed)
    x = torch.randn(k_in, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    keep = data.draw(st.integers(0, k_in))

    wina_error = _error(w, x, topk_mask(x, channel_scores("wina", w), keep).double())
    teal_error = _error(w, x, topk_mask(x, channel_scores("teal", w), keep).double())
    best = min(
        _error(w, x, torch.tensor([float(i in subset) for i in range(k_in)], dtype=torch.float64))
        for subset in itertools.combinations(range(k_in), keep)
    )
    scale = torch.linalg.vector_norm(w @ x).item() + 1e-12
    assert wina_error <= best + 1e-6 * scale
    assert wina_error <= teal_error + 1e-6 * scale
