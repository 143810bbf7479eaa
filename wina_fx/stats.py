"""Uncertainty of perplexity, so that a difference between methods can be told from noise.

The unit of resampling is the evaluation window (a block of consecutive tokens): tokens
within a window are not independent, windows nearly are.  Each window contributes its
summed next-token negative log-likelihood and its number of predicted tokens; perplexity
is exp(sum nll / sum tokens).  Intervals are scipy's bootstrap (BCa) over windows:

* ``perplexity_interval``: the 95 % interval of one configuration's perplexity;
* ``paired_difference``: two configurations scored on the same windows, the interval of
  the difference of their log-perplexities, resampling windows jointly (paired), which
  removes the variance the windows share (a hard window is hard for both);
* ``paired_accuracy_difference``: the same for multiple-choice accuracy, items as the unit.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000


def _log_ppl(nll: np.ndarray, tokens: np.ndarray, axis: int = -1) -> np.ndarray:
    return nll.sum(axis=axis) / tokens.sum(axis=axis)


def perplexity_interval(window_nll: Sequence[float], window_tokens: Sequence[int], confidence: float = CONFIDENCE,
                        resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """[low, high] of exp(sum nll / sum tokens), bootstrapped over windows."""
    nll, tokens = np.asarray(window_nll, dtype=np.float64), np.asarray(window_tokens, dtype=np.float64)
    low, high = _interval((nll, tokens), _log_ppl, nll / tokens, confidence, resamples, seed)
    return math.exp(low), math.exp(high)


def paired_difference(nll_a: Sequence[float], nll_b: Sequence[float], window_tokens: Sequence[int],
                      confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """log ppl(a) - log ppl(b) on the same windows, its interval, and whether the interval
    excludes 0 (``significant``).  Negative: a predicts the text better."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    tokens = np.asarray(window_tokens, dtype=np.float64)
    if not len(a) == len(b) == len(tokens):
        raise ValueError(f"paired_difference needs the same windows: {len(a)}, {len(b)} and {len(tokens)} values")

    def difference(x, y, t, axis=-1):
        return _log_ppl(x, t, axis) - _log_ppl(y, t, axis)

    low, high = _interval((a, b, tokens), difference, (a - b) / tokens, confidence, resamples, seed)
    return {"log_ppl_difference": float(difference(a, b, tokens)), "ci": [low, high],
            "significant": not low <= 0.0 <= high}


def paired_accuracy_difference(correct_a: Sequence[int], correct_b: Sequence[int], confidence: float = CONFIDENCE,
                               resamples: int = RESAMPLES, seed: int = 0) -> dict:
    """acc(a) - acc(b) on the same multiple-choice items (each 0 or 1, in the same order), its
    interval resampling items jointly, and whether the interval excludes 0 (``significant``).
    Positive: a answers more items right."""
    a, b = np.asarray(correct_a, dtype=np.float64), np.asarray(correct_b, dtype=np.float64)
    if len(a) != len(b):
        raise ValueError(f"paired_accuracy_difference needs the same items: {len(a)} and {len(b)} values")

    def difference(x, y, axis=-1):
        return x.mean(axis=axis) - y.mean(axis=axis)

    low, high = _interval((a, b), difference, a - b, confidence, resamples, seed)
    return {"acc_difference": float(difference(a, b)), "ci": [low, high], "significant": not low <= 0.0 <= high}


def _interval(samples: tuple, statistic, per_window: np.ndarray, confidence: float, resamples: int,
              seed: int) -> tuple[float, float]:
    """The BCa interval of ``statistic`` over windows resampled jointly; the point value when
    there is nothing to resample (one window, or every window alike: BCa is undefined then)."""
    if len(per_window) < 2 or np.ptp(per_window) == 0:
        value = float(statistic(*samples))
        return value, value
    result = stats.bootstrap(samples, statistic, paired=True, vectorized=True, confidence_level=confidence,
                             n_resamples=resamples, method="BCa", random_state=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
