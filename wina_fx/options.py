"""Option values of wina-fx and their normalization, in one place.

This module imports nothing else of the package, so that every other module (the config,
calibration, allocation, evaluation, the CLI) can check an option the same way without
importing one another.  The method names are not here: methods are plug-ins
(``wina_fx.methods``), and their registry is the list of valid names.
"""
from __future__ import annotations

from typing import Any

SELECTIONS = ("topk", "threshold")
ALLOCATIONS = ("uniform", "greedy")
PREFILLS = ("sparse", "dense")
# Variants of the weight-orthogonalization prepass (passes/orthogonalize/); True = "full".
ORTHOGONALIZE = ("full", "local", "shared")
# Inductor modes; torch.compile refuses mode= together with options=, so ours is an option.
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _option_error_base() -> tuple[type, ...]:
    # Dynamo wraps backend exceptions in BackendCompilerFailed, except those derived
    # from ShortenTraceback, which it re-raises as they are. Deriving from it lets a bad
    # option reach the user as a plain ValueError with a short traceback.
    try:
        from torch._dynamo.exc import ShortenTraceback

        return (ValueError, ShortenTraceback)
    except ImportError:  # pragma: no cover - older torch
        return (ValueError,)


class WinaOptionError(*_option_error_base()):
    """A bad ``options`` entry for ``backend="wina"``."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.first_useful_frame = None  # what ShortenTraceback reads; None keeps every frame


class CalibrationMissing(WinaOptionError):
    """The options need option 'calibration' and have none."""


def fail(message: str, error: type[WinaOptionError] = WinaOptionError) -> None:
    raise error(f"wina-fx: {message}")


def one_of(where: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; else WinaOptionError naming them."""
    if not isinstance(value, str) or value not in choices:
        fail(f"{where} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def sparsity_value(where: str, value: Any) -> float:
    """A sparsity: a float in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(f"{where} must be a float in [0, 1), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        fail(f"{where} must be in [0, 1), got {value!r}")
    return value


def orthogonalize_variant(value: Any, where: str = "option 'orthogonalize'") -> str | None:
    """The prepass variant asked for: None (off) or one of ORTHOGONALIZE (True = "full")."""
    if value is True:
        return "full"
    if value is False or value is None:
        return None
    if not isinstance(value, str) or value not in ORTHOGONALIZE:
        fail(f"{where} must be True, False or one of {', '.join(map(repr, ORTHOGONALIZE))}, got {value!r}")
    return value
