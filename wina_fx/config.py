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

from .calibration import Calibration
from .methods import get_method, method_names
from .options import (ALLOCATIONS, MODES, PREFILLS, SELECTIONS, CalibrationMissing, WinaOptionError, fail, one_of,
                      orthogonalize_variant, sparsity_value)

__all__ = ["WinaConfig", "WinaOptionError", "ALLOCATIONS", "MODES", "PREFILLS", "SELECTIONS"]


@dataclasses.dataclass(frozen=True)
class WinaConfig:
    """Options of ``torch.compile(model, backend="wina", options={...})``.

    method:      a registered method (``wina_fx.methods.method_names()``): "wina"
                 (|x_i| * ||W[:, i]||_2), "teal" (|x_i|), "cats" (gated MLPs only:
                 |act(gate(x))| masks the down projection's input), "rsparse" (|x_i| *
                 ||W[:, i]||_2 plus a low-rank correction of the dropped channels), "dense",
                 or one registered with ``wina_fx.register_method``.
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
    pdl:         on sm_90+ GPUs, kernels are launched early, while the kernel before them
                 finishes, and wait for its output on the GPU (programmatic dependent
                 launch): Inductor's own (``triton.enable_pdl`` for this graph) and the
                 sparse GEMVs (``early_launch.py``).  False: each kernel launches when the
                 one before has ended.
    sdpa_gqa:    attention of one query token over grouped K/V heads runs as sdpa's own
                 grouped-query attention (``enable_gqa``) over the K/V heads as stored
                 (``passes/sdpa_gqa.py``), instead of over the copy of K and V repeated per
                 query head that transformers' sdpa attention makes under torch.compile.
                 Same attention; False: attention as traced.
    prefill:     "sparse" (every step sparse, as the papers evaluate) or "dense": a graph
                 whose steps carry more than one new token per sequence (prefill) runs
                 its linears dense, exactly; one-token decode steps run sparse.
    recipe:      "default", or a recipe of the method, e.g. "paper" (wina, teal): the
                 configuration the WINA paper's code ran (``wina_fx.methods.base.Recipe``;
                 wina: its transform, column norms on k_proj / gate_proj only; both: the
                 first 1 % of each sequence dense; teal: up keeps the gate's mask).
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
    pdl: bool = True
    sdpa_gqa: bool = True
    prefill: str = "sparse"
    recipe: str = "default"

    @property
    def recipe_spec(self):
        """The ``Recipe`` that option ``recipe`` names for this method."""
        return get_method(self.method).recipes[self.recipe]

    @property
    def prepass(self) -> tuple[str | None, Mapping[str, str] | None]:
        """(variant, sources) of the orthogonalization prepass (``Recipe.prepass``)."""
        return self.recipe_spec.prepass(self.orthogonalize)

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
            fail(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                fail(f"unknown option {key!r}; valid options are {', '.join(valid)}")
        return cls(**options)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in method_names():
            fail(f"option 'method' must be one of {', '.join(map(repr, method_names()))}, got {self.method!r}")
        if isinstance(self.sparsity, Mapping):
            checked = {}
            for pattern, value in self.sparsity.items():
                if not isinstance(pattern, str) or not pattern:
                    fail(f"option 'sparsity' keys must be non-empty module-name patterns (str), got {pattern!r}")
                checked[pattern] = sparsity_value(f"option 'sparsity'[{pattern!r}]", value)
            object.__setattr__(self, "sparsity", checked)
        else:
            object.__setattr__(self, "sparsity", sparsity_value("option 'sparsity'", self.sparsity))
        one_of("option 'selection'", self.selection, SELECTIONS)
        one_of("option 'prefill'", self.prefill, PREFILLS)
        one_of("option 'mode'", self.mode, MODES)
        for flag in ("measure", "inductor", "group", "pdl", "sdpa_gqa"):
            if not isinstance(getattr(self, flag), bool):
                fail(f"option {flag!r} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "orthogonalize", orthogonalize_variant(self.orthogonalize))
        one_of("option 'sparsity_allocation'", self.sparsity_allocation, ALLOCATIONS)
        one_of(f"option 'recipe' of method {self.method!r}", self.recipe, tuple(get_method(self.method).recipes))
        if self.recipe_spec.transform is not None and self.orthogonalize is not None:
            fail(f"option recipe={self.recipe!r} brings its own transform (orthogonalize "
                 f"{self.recipe_spec.transform[0]!r} with its sources): leave option 'orthogonalize' False")
        self._check_calibration()
        share = self.rsparse_share
        if share != "search" and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
            fail(f"option 'rsparse_share' must be 'search' or a float in (0, 1] (e.g. 0.95), got {share!r}")
        if share != "search":
            object.__setattr__(self, "rsparse_share", float(share))
        get_method(self.method).check(self)

    def _check_calibration(self) -> None:
        cal = self.calibration
        if isinstance(cal, (str, os.PathLike)):
            try:
                cal = Calibration.load(cal)
            except (OSError, ValueError) as err:
                fail(f"option 'calibration': {err}")
            object.__setattr__(self, "calibration", cal)
        elif cal is not None and not isinstance(cal, Calibration):
            fail("option 'calibration' must be a wina_fx.Calibration or a path to a saved one, "
                 f"got {type(cal).__name__}")
        greedy = self.sparsity_allocation == "greedy"
        if greedy and not isinstance(self.sparsity, float):
            fail("option sparsity_allocation='greedy' needs one float 'sparsity' (the model-wide target), not a mapping")
        if (self.selection == "threshold" or greedy) and get_method(self.method).calibrated:
            needs = "selection='threshold'" if self.selection == "threshold" else "sparsity_allocation='greedy'"
            if cal is None:
                fail(f"option {needs} needs option 'calibration' "
                     "(from wina_fx.calibrate(model, inputs)); or use selection='topk' and sparsity_allocation='uniform'",
                     CalibrationMissing)
            if cal.method != self.method:
                fail(f"option 'calibration' was measured for method {cal.method!r}, "
                     f"but option 'method' is {self.method!r}; calibrate again with method={self.method!r}")
            if cal.recipe != self.recipe:
                fail(f"option 'calibration' was measured with recipe={cal.recipe!r}, but option 'recipe' is "
                     f"{self.recipe!r}; calibrate again with recipe={self.recipe!r}")
            if cal.orthogonalize != self.orthogonalize:
                fail(f"option 'calibration' was measured with orthogonalize={cal.orthogonalize!r}, but option "
                     f"'orthogonalize' is {self.orthogonalize!r}; calibrate again with orthogonalize={self.orthogonalize!r}")
            if greedy and cal.allocation(self.sparsity) is None:
                targets = ", ".join(f"{t:g}" for t in cal.allocation_targets) or "none"
                fail(f"option 'calibration' holds no greedy allocation for sparsity {self.sparsity:g} "
                     f"(it has: {targets}); calibrate with allocation_targets=[{self.sparsity:g}, ...]")


def needs_calibration(options: Mapping[str, Any]) -> bool:
    """Whether ``options`` need option 'calibration' (threshold selection, greedy allocation,
    R-Sparse's search, ...); any other bad option raises WinaOptionError."""
    try:
        WinaConfig.from_options({**options, "calibration": None})
    except CalibrationMissing:
        return True
    return False
