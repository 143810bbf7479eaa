"""The one validated configuration object behind ``options={...}``.

Every option is checked here, before the backend looks at a graph: a wrong name, a
wrong type or an out-of-range value raises ``WinaOptionError`` (a ``ValueError``)
that names the option and the valid choices.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Mapping
from typing import Any

METHODS = ("wina", "teal", "cats", "rsparse", "dense")
SELECTIONS = ("topk", "threshold")
ALLOCATIONS = ("uniform", "greedy")
PREFILLS = ("sparse", "dense")
# Variants of the weight-orthogonalization prepass (passes/orthogonalize.py); True = "full".
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


def _fail(message: str) -> None:
    raise WinaOptionError(f"wina-fx: {message}")


def _check_sparsity_value(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(f"{where} must be a float in [0, 1), got {value!r} ({type(value).__name__})")
    value = float(value)
    if not 0.0 <= value < 1.0:  # also rejects NaN
        _fail(f"{where} must be in [0, 1), got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class WinaConfig:
    """Options of ``torch.compile(model, backend="wina", options={...})``.

    method:      "wina" (|x_i| * ||W[:, i]||_2), "teal" (|x_i|), "cats" (gated MLPs only:
                 |act(gate(x))| masks the down projection's input), "rsparse" (|x_i| *
                 ||W[:, i]||_2 plus a low-rank correction of the dropped channels) or "dense".
    sparsity:    fraction of input channels to skip, a float in [0, 1), or a mapping
                 from module-name patterns (fnmatch, first match wins) to such floats;
                 linears no pattern matches stay dense.
    selection:   "topk" (exact per-token sparsity) or "threshold" (calibrated, no sort).
    calibration: a ``Calibration`` or a path to one saved earlier; needed by "threshold".
    measure:     count the sparsity each linear actually reaches at run time.
    inductor:    compile the rewritten graph with Inductor (True) or run it as an FX
                 graph, op by op (False): slower, for debugging and quick tests.
    mode:        Inductor mode, e.g. "reduce-overhead" for CUDA graphs (torch.compile
                 does not accept mode= beside options=).
    orthogonalize: False, True (= "full") or a variant name ("full", "local", "shared"):
                 run the weight-orthogonalization prepass before gating.
    sparsity_allocation: "uniform" (every linear gets ``sparsity``) or "greedy" (one
                 sparsity per linear, averaging ``sparsity`` per block, taken from the
                 calibration, which must hold an allocation for that target).
    rsparse_share: method "rsparse" only: "search" (per matrix, the share of the compute
                 budget spent on sparse channels, the rest on the low-rank correction, is
                 searched on the calibration's tokens) or one share in (0, 1] for every
                 matrix (1 = no low-rank part; 0.95 is R-Sparse's uniform setting).
    group:       on CUDA, run threshold linears that read the same input (q/k/v, gate/up)
                 as one kernel launch over their weights side by side (True), or one
                 launch each (False).  Outputs are the same either way.
    prefill:     "sparse" (every step sparse, as the papers evaluate) or "dense": a graph
                 whose steps carry more than one new token per sequence (prefill) runs
                 its linears dense, exactly; one-token decode steps run sparse.
    """

    method: str = "wina"
    sparsity: float | Mapping[str, float] = 0.5
    selection: str = "topk"
    calibration: Any = None
    measure: bool = False
    inductor: bool = True
    mode: str = "default"
    orthogonalize: bool | str = False
    sparsity_allocation: str = "uniform"
    rsparse_share: str | float = "search"
    group: bool = True
    prefill: str = "sparse"

    def sparsity_for(self, module_name: str) -> float | None:
        """Target sparsity of one linear, or None when no pattern covers it."""
        if self.sparsity_allocation == "greedy":
            return self.calibration.allocation(self.sparsity).get(module_name)
        if isinstance(self.sparsity, float):
            return self.sparsity
        for pattern, value in self.sparsity.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return value
        return None

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | "WinaConfig" | None) -> "WinaConfig":
        """Validate user options; raise ``WinaOptionError`` naming what is wrong."""
        if options is None:
            return cls()
        if isinstance(options, WinaConfig):
            return options
        if not isinstance(options, Mapping):
            _fail(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                _fail(f"unknown option {key!r}; valid options are {', '.join(valid)}")
        return cls(**options)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            _fail(f"option 'method' must be one of {', '.join(map(repr, METHODS))}, got {self.method!r}")
        if isinstance(self.sparsity, Mapping):
            checked = {}
            for pattern, value in self.sparsity.items():
                if not isinstance(pattern, str) or not pattern:
                    _fail(f"option 'sparsity' keys must be non-empty module-name patterns (str), got {pattern!r}")
                checked[pattern] = _check_sparsity_value(f"option 'sparsity'[{pattern!r}]", value)
            object.__setattr__(self, "sparsity", checked)
        else:
            object.__setattr__(self, "sparsity", _check_sparsity_value("option 'sparsity'", self.sparsity))
        if not isinstance(self.selection, str) or self.selection not in SELECTIONS:
            _fail(f"option 'selection' must be one of {', '.join(map(repr, SELECTIONS))}, got {self.selection!r}")
        if not isinstance(self.prefill, str) or self.prefill not in PREFILLS:
            _fail(f"option 'prefill' must be one of {', '.join(map(repr, PREFILLS))}, got {self.prefill!r}")
        if not isinstance(self.mode, str) or self.mode not in MODES:
            _fail(f"option 'mode' must be one of {', '.join(map(repr, MODES))}, got {self.mode!r}")
        for flag in ("measure", "inductor", "group"):
            if not isinstance(getattr(self, flag), bool):
                _fail(f"option {flag!r} must be True or False, got {getattr(self, flag)!r}")
        orth = self.orthogonalize
        if orth is True:
            orth = "full"
        if orth is not False and orth is not None and not (isinstance(orth, str) and orth in ORTHOGONALIZE):
            _fail(
                f"option 'orthogonalize' must be True, False or one of {', '.join(map(repr, ORTHOGONALIZE))}, "
                f"got {self.orthogonalize!r}"
            )
        object.__setattr__(self, "orthogonalize", orth or None)  # None or a variant name
        if not isinstance(self.sparsity_allocation, str) or self.sparsity_allocation not in ALLOCATIONS:
            _fail(
                f"option 'sparsity_allocation' must be one of {', '.join(map(repr, ALLOCATIONS))}, "
                f"got {self.sparsity_allocation!r}"
            )
        self._check_calibration()
        self._check_rsparse()

    def _check_calibration(self) -> None:
        from .calibration import Calibration

        cal = self.calibration
        if isinstance(cal, (str, os.PathLike)):
            try:
                cal = Calibration.load(cal)
            except (OSError, ValueError) as err:
                _fail(f"option 'calibration': {err}")
            object.__setattr__(self, "calibration", cal)
        elif cal is not None and not isinstance(cal, Calibration):
            _fail(
                "option 'calibration' must be a wina_fx.Calibration or a path to a saved one, "
                f"got {type(cal).__name__}"
            )
        greedy = self.sparsity_allocation == "greedy"
        if greedy and not isinstance(self.sparsity, float):
            _fail("option sparsity_allocation='greedy' needs one float 'sparsity' (the model-wide target), not a mapping")
        if (self.selection == "threshold" or greedy) and self.method != "dense":
            needs = "selection='threshold'" if self.selection == "threshold" else "sparsity_allocation='greedy'"
            if cal is None:
                _fail(
                    f"option {needs} needs option 'calibration' "
                    "(from wina_fx.calibrate(model, inputs)); or use selection='topk' and sparsity_allocation='uniform'"
                )
            if cal.method != self.method:
                _fail(
                    f"option 'calibration' was measured for method {cal.method!r}, "
                    f"but option 'method' is {self.method!r}; calibrate again with method={self.method!r}"
                )
            if cal.orthogonalize != self.orthogonalize:
                _fail(
                    f"option 'calibration' was measured with orthogonalize={cal.orthogonalize!r}, but option "
                    f"'orthogonalize' is {self.orthogonalize!r}; calibrate again with orthogonalize={self.orthogonalize!r}"
                )
            if greedy and cal.allocation(self.sparsity) is None:
                targets = ", ".join(f"{t:g}" for t in cal.allocation_targets) or "none"
                _fail(
                    f"option 'calibration' holds no greedy allocation for sparsity {self.sparsity:g} "
                    f"(it has: {targets}); calibrate with allocation_targets=[{self.sparsity:g}, ...]"
                )

    def _check_rsparse(self) -> None:
        share = self.rsparse_share
        if share != "search" and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
            _fail(f"option 'rsparse_share' must be 'search' or a float in (0, 1] (e.g. 0.95), got {share!r}")
        if share != "search":
            object.__setattr__(self, "rsparse_share", float(share))
        elif self.method == "rsparse":
            cal = self.calibration
            if cal is None or cal.method != "rsparse" or not getattr(cal, "samples", None):
                _fail(
                    "option method='rsparse' with rsparse_share='search' needs option 'calibration' from "
                    "wina_fx.calibrate(model, inputs, method='rsparse') (it keeps the tokens the search uses); "
                    "or give rsparse_share a float in (0, 1], e.g. 0.95"
                )
