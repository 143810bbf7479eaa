"""Bootstrap intervals of perplexity over evaluation windows (wina_fx.stats)."""
import math

import numpy as np
import pytest

from wina_fx.stats import paired_accuracy_difference, paired_difference, perplexity_interval


def _windows(n, seed, mean=3.0, spread=0.3, tokens=511):
    rng = np.random.default_rng(seed)
    return list(tokens * rng.normal(mean, spread, n)), [tokens] * n


def test_perplexity_interval_holds_the_estimate_and_narrows_with_more_windows():
    widths = []
    for n in (8, 128):
        nll, tokens = _windows(n, seed=n)
        low, high = perplexity_interval(nll, tokens)
        point = math.exp(sum(nll) / sum(tokens))
        assert low < point < high
        widths.append(math.log(high / low))
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x narrower for 16x the windows
    assert perplexity_interval([1000.0] * 4, [500] * 4) == pytest.approx((math.e**2, math.e**2))


def test_paired_difference_finds_a_small_consistent_shift_that_unpaired_intervals_miss():
    nll, tokens = _windows(64, seed=1, spread=0.5)
    shifted = [v + 0.01 * t for v, t in zip(nll, tokens)]  # +0.01 nats per token on every window
    result = paired_difference(shifted, nll, tokens)
    assert result["log_ppl_difference"] == pytest.approx(0.01)
    assert result["significant"] and result["ci"][0] > 0
    a, b = perplexity_interval(shifted, tokens), perplexity_interval(nll, tokens)
    assert a[0] < b[1]  # unpaired, the two intervals overlap

    rng = np.random.default_rng(2)
    noisy = [v + t * rng.normal(0, 0.02) for v, t in zip(nll, tokens)]
    assert not paired_difference(noisy, nll, tokens)["significant"]
    assert paired_difference(nll, nll, tokens) == {"log_ppl_difference": 0.0, "ci": [0.0, 0.0], "significant": False}
    with pytest.raises(ValueError, match="same windows"):
        paired_difference(nll[:3], nll[:4], tokens[:3])


def test_paired_accuracy_difference_separates_a_real_gap_from_noise():
    """Two configurations on the same 500 items: one that answers 40 more right is
    significantly ahead; one that trades 20 items for 20 others is not; the sign and the
    point value are acc(a) - acc(b)."""
    rng = np.random.default_rng(0)
    base = (rng.random(500) < 0.6).astype(int)
    better = base.copy()
    better[np.flatnonzero(base == 0)[:40]] = 1
    swapped = base.copy()
    swapped[np.flatnonzero(base == 0)[:20]] = 1
    swapped[np.flatnonzero(base == 1)[:20]] = 0
    gap = paired_accuracy_difference(better, base)
    assert gap["acc_difference"] == pytest.approx(40 / 500) and gap["significant"] and gap["ci"][0] > 0
    same = paired_accuracy_difference(swapped, base)
    assert same["acc_difference"] == 0 and not same["significant"]
    assert paired_accuracy_difference(base, base) == {"acc_difference": 0.0, "ci": [0.0, 0.0], "significant": False}
    with pytest.raises(ValueError, match="same items"):
        paired_accuracy_difference(base, base[:-1])
