"""What a method is, and the registry of methods by name.

A method is one object (a subclass of ``Method``) registered under its ``name``: it says
how it ranks a linear's input channels, which linears it sparsifies and how (its ``plan``),
what calibration observes for it, and whether greedy allocation applies.  The built-in
methods (wina, teal, cats, rsparse, dense) register themselves exactly as an outside one
does with ``wina_fx.register_method``; ``options={"method": name}`` then selects it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.fx as fx

from wina_fx import sharded

from .plan import Plan, plan_scored

_REGISTRY: dict[str, "Method"] = {}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How a method is run beyond its score (option ``recipe``): "default" is this backend's
    choice; a method may add others, such as the configuration its paper ran.

    transform:    (variant, sources) of the orthogonalization prepass this recipe brings
                  (then option ``orthogonalize`` must stay off), or None.
    scored_kinds: linears (the last part of their name, e.g. "k_proj") that rank by the
                  method's score; the others rank by |x_i| alone.  None: every linear.
    dense_prefix: the share of each sequence's first positions left dense (a forward over
                  T tokens keeps the first T - int((1 - share) T) of them dense).
    shared_gate_up: the up projection of a gated MLP keeps the channels its gate keeps.
    score_power:  scored linears rank by |x_i| * score_i ** score_power (1: the method's own
                  score; 0: |x| alone; 0.5 weighs the score halfway, on a log scale).
    """

    name: str = "default"
    transform: tuple[str, Mapping[str, str]] | None = None
    scored_kinds: tuple[str, ...] | None = None
    dense_prefix: float = 0.0
    shared_gate_up: bool = False
    score_power: float = 1.0

    def prepass(self, orthogonalize: str | None) -> tuple[str | None, Mapping[str, str] | None]:
        """(variant, sources) of the orthogonalization prepass: this recipe's transform, or
        option ``orthogonalize`` with the default sources (variant None: no prepass)."""
        return self.transform or (orthogonalize, None)

    def scored(self, linear_name: str) -> bool:
        return self.scored_kinds is None or linear_name.rsplit(".", 1)[-1] in self.scored_kinds


DEFAULT_RECIPE = Recipe()


class Method:
    """An activation-sparsity method.  Subclass it, set ``name``, override what differs.

    The default is a scored method: each linear keeps the input channels of largest
    importance |x_i| * score_i (``score(weight)``, one float per input channel) by the
    option ``selection``: top-k per token, or a threshold calibrated by ``wina_fx.calibrate``.
    Override ``plan`` for a method that rewrites the graph (see ``cats`` and ``rsparse``).
    """

    name: str = ""
    score_label: str = "method score"  # what the report says a linear ranked by
    recipes: Mapping[str, Recipe] = {"default": DEFAULT_RECIPE}
    calibrated: bool = True  # wina_fx.calibrate observes it (selection="threshold" works)
    allocated: bool = False  # greedy allocation models its keep rule (a top-k of |x_i| * score_i)
    keeps_input_rows: bool = False  # calibration also keeps whole input rows of each linear

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        """(K,) float32 scores of the input channels of a weight (N, K)."""
        raise NotImplementedError(f"method {self.name!r} defines no channel score")

    def site_score(self, site, recipe: Recipe = DEFAULT_RECIPE) -> tuple[torch.Tensor, str]:
        """(score vector, label) of one linear under ``recipe``."""
        if recipe.scored(site.name):
            if recipe.score_power != 1.0:
                return self.score(site.weight).pow(recipe.score_power), f"{self.score_label} ^ {recipe.score_power:g}"
            return self.score(site.weight), self.score_label
        return unit_scores(site.weight), "|x| only (recipe)"

    def plan(self, config, sites) -> Plan:
        """A ``Plan`` for the linears ``sites`` under ``config`` (a WinaConfig): which are
        gated by which keep rule, which graph rewrite runs first, why the others stay dense."""
        return plan_scored(self, config, sites)

    def observed_inputs(self, sites) -> dict[int, fx.Node]:
        """The node whose importance calibration records for each observed linear (by index)."""
        return {index: site.input for index, site in enumerate(sites)}

    def reads_calibration(self, config) -> bool:
        """Whether ``plan`` reads ``config.calibration`` (the backend then checks that it
        was measured on this model): threshold selection and greedy allocation do."""
        return self.calibrated and (config.selection == "threshold" or config.sparsity_allocation == "greedy")

    def check(self, config) -> None:
        """Option checks of this method beyond the common ones; raise WinaOptionError."""

    def __repr__(self) -> str:
        return f"<wina_fx method {self.name!r}>"


def register_method(method: Method, replace: bool = False) -> Method:
    """Make ``method`` selectable as ``options={"method": method.name}`` (and by
    ``wina_fx.calibrate``).  A name already taken needs ``replace=True``."""
    if not isinstance(method, Method):
        raise TypeError(f"register_method takes a wina_fx.Method instance, got {type(method).__name__}")
    if not isinstance(method.name, str) or not method.name:
        raise ValueError(f"a method needs a non-empty str name, got {method.name!r}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"method {method.name!r} is registered already; pass replace=True to replace it")
    _REGISTRY[method.name] = method
    return method


def unregister_method(name: str) -> Method:
    """Remove the method registered as ``name`` and return it."""
    get_method(name)
    return _REGISTRY.pop(name)


def get_method(name: str) -> Method:
    """The method registered as ``name``; ValueError naming the registered ones."""
    if isinstance(name, str) and name in _REGISTRY:
        return _REGISTRY[name]
    raise ValueError(f"no method {name!r}; registered: {', '.join(map(repr, method_names()))}")


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def registry() -> Mapping[str, Method]:
    return dict(_REGISTRY)


def column_norms(weight: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """||W[:, i]||_2 in float32, summed over blocks of rows: never a float32 copy of the
    whole weight (for an 8B model's largest matrix that copy would be 235 MB of memory
    the compile holds only to read it once)."""
    if sharded.is_sharded(weight):  # tensor parallel: one all-reduce for a column-parallel W
        return sharded.column_norms(weight)
    squares = torch.zeros(weight.shape[1], dtype=torch.float32, device=weight.device)
    for block in weight.detach().split(rows, dim=0):
        squares += block.float().square().sum(dim=0)
    return squares.sqrt()


def unit_scores(weight: torch.Tensor) -> torch.Tensor:
    """Ones: the importance of channel i is |x_i| alone."""
    if sharded.is_sharded(weight):
        return sharded.unit_scores(weight)
    return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
