"""R-Sparse's per-matrix recipe: how many input channels a linear keeps exactly, and what
rank corrects the ones it drops, at the compute of plain sparsity s.

The rule (R-Sparse, Zhang et al., ICLR 2025; code VITA-Group/R-Sparse, read here in its
public fork Calamansi39/R-Sparse: ``R_Sparse_Linear.forward`` mode 'r_sparse' in
models/modeling_llama.py, and utils/prepare_low_rank_weight.py):

    W = U S V^T                      SVD, once per matrix, in float64
    scale_i = ||(V S)[i, :]||_2      (= ||W[:, i]||_2, the column norm of W)
    m = keep rule on |x_i| * scale_i (a calibrated threshold; or the top k of each token)
    y = W (x * m) + ((x * (1 - m)) V_r S_r) U_r^T

The budget (utils/setup.py, ``set_threshold_r_sparse``): at target sparsity s a matrix may
spend what plain sparsity spends, (1 - s) K N multiply-adds per token (and as many weight
elements read). A sparse share a in (0, 1] keeps c = max(1, floor(a (1 - s) K)) channels,
costing c N; the rest of the budget buys the rank r = floor(((1 - s) K N - c N) / (K + N)),
each rank costing one column of V S and one row of U^T (K + N). So c N + r (K + N) never
exceeds (1 - s) K N; at s = 0 and a = 1 the linear is exactly dense.

The search: the paper finds the share per matrix by an evolutionary search on the model's
outputs. This one is per matrix and local: for the target s, each share of ``SHARES`` gives a
(c, r) pair on the budget; the pair with the least relative output error
||W x - y_approx||^2 / ||W x||^2 on calibration tokens (with the keep rule that will run:
top-k, or the calibrated threshold) is kept. ``DEFAULT_SHARE`` is the fixed share used
without a search.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable

import torch

from wina_fx.kernels import reference
from wina_fx.options import CalibrationMissing, WinaOptionError, fail
from wina_fx.passes.find_linears import LinearSite
from wina_fx.passes.keep_rule import KeepRule
from wina_fx.passes.low_rank import LowRankSplit, split_low_rank

from .base import Method, column_norms
from .plan import Plan, dense_reason, keep_rule, row, zero_skipping_gate

SHARES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
DEFAULT_SHARE = 0.95  # the uniform sparse share the paper reports using (grid-searched there on C4)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One matrix's split: ``channels`` kept per token (top-k; a threshold aims at the same
    fraction) and the ``rank`` of the correction; ``error`` is the relative output error on
    calibration tokens when the recipe was searched."""

    share: float
    channels: int
    rank: int
    error: float | None = None

    def channel_sparsity(self, in_features: int) -> float:
        """Fraction of input channels the sparse part skips."""
        return 1.0 - self.channels / in_features

    def compute_sparsity(self, in_features: int, out_features: int) -> float:
        """1 - (what the split costs per token) / (what the dense linear costs)."""
        cost = self.channels * out_features + self.rank * (in_features + out_features)
        return 1.0 - cost / (in_features * out_features)


def budget_recipe(in_features: int, out_features: int, sparsity: float, share: float) -> Recipe:
    """The (channels, rank) pair that spends the budget of sparsity ``sparsity`` with ``share`` of
    it on sparse channels (R-Sparse's rule, see the module docstring)."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"R-Sparse sparse share must be in (0, 1], got {share!r}")
    k, n = in_features, out_features
    allowed = (1.0 - sparsity) * k * n
    channels = min(k, max(1, math.floor(share * (1.0 - sparsity) * k + 1e-9)))
    rank = max(0, math.floor((allowed - channels * n) / (k + n) + 1e-9))
    return Recipe(share, channels, min(rank, k, n))


@dataclasses.dataclass
class Factors:
    """W = U diag(S) Vh in float64, and R-Sparse's per-channel scale (float32)."""

    u: torch.Tensor  # (N, m)
    s: torch.Tensor  # (m,)
    vh: torch.Tensor  # (m, K)
    scale: torch.Tensor  # (K,)

    def low_rank(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(V_r S_r of shape (K, r), U_r^T of shape (r, N)), float64."""
        return (self.vh[:rank].t() * self.s[:rank]), self.u[:, :rank].t()


def factors(weight: torch.Tensor) -> Factors:
    """The SVD of ``weight`` (N, K), taken in float64, and the scale ||(V S)[i, :]||_2."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    scale = (vh.t() * s).norm(dim=1).float()
    return Factors(u, s, vh, scale)


def keep_mask(x: torch.Tensor, scale: torch.Tensor, channels: int, threshold: float | None = None) -> torch.Tensor:
    """R-Sparse's mask: top ``channels`` of |x_i| * scale_i per token, or above ``threshold``."""
    if threshold is None:
        return reference.topk_mask(x, scale, channels)
    return reference.threshold_mask(x, scale, threshold)


def split_output(x: torch.Tensor, weight: torch.Tensor, f: Factors, recipe: Recipe,
                 threshold: float | None = None) -> torch.Tensor:
    """y = W (x * m) + ((x * (1 - m)) V_r S_r) U_r^T, in float64 (no bias)."""
    x = x.double()
    mask = keep_mask(x, f.scale, recipe.channels, threshold)
    vs, ut = f.low_rank(recipe.rank)
    return (x * mask) @ weight.double().t() + ((x * ~mask) @ vs) @ ut


def output_error(x: torch.Tensor, weight: torch.Tensor, f: Factors, recipe: Recipe,
                 threshold: float | None = None) -> float:
    """||W x - split_output||^2 / ||W x||^2 over the tokens ``x`` (n, K)."""
    dense = x.double() @ weight.double().t()
    error = (dense - split_output(x, weight, f, recipe, threshold)).square().sum()
    return float(error / dense.square().sum().clamp_min(1e-300))


def search(weight: torch.Tensor, tokens: torch.Tensor, sparsity: float, f: Factors | None = None,
           threshold_for: Callable[[float], float] | None = None, shares=SHARES) -> Recipe:
    """The recipe of ``shares`` with the least output error on ``tokens`` (n, K) at ``sparsity``.

    ``threshold_for(channel_sparsity)`` gives the calibrated threshold (threshold selection);
    None means top-k. Ties go to the earlier share (``SHARES`` starts with the sparsest-only).
    """
    f = f if f is not None else factors(weight)
    tokens = tokens.to(weight.device)  # a calibration keeps its tokens on the CPU
    n, k = weight.shape
    best, seen = None, set()
    for share in shares:
        recipe = budget_recipe(k, n, sparsity, share)
        if (recipe.channels, recipe.rank) in seen:
            continue
        seen.add((recipe.channels, recipe.rank))
        threshold = None if threshold_for is None else threshold_for(recipe.channel_sparsity(k))
        error = output_error(tokens, weight, f, recipe, threshold)
        if best is None or error < best.error:
            best = dataclasses.replace(recipe, error=error)
    return best


class RSparse(Method):
    """Each linear keeps the channels of largest |x_i| * ||W[:, i]||_2 exactly and corrects
    the rest with a rank-r part of W's SVD, at the compute of plain sparsity.  Option
    ``rsparse_share``: the recipe is searched per matrix on the calibration's tokens
    ("search") or one sparse share for every matrix."""

    name = "rsparse"
    keeps_input_rows = True  # the search replays whole input rows

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        return column_norms(weight)  # ||(V S)[i, :]||_2 = ||W[:, i]||_2

    def reads_calibration(self, config) -> bool:
        return config.rsparse_share == "search" or super().reads_calibration(config)

    def check(self, config) -> None:
        cal = config.calibration
        if config.rsparse_share == "search" and (cal is None or cal.method != self.name or not cal.samples):
            fail("option method='rsparse' with rsparse_share='search' needs option 'calibration' from "
                 "wina_fx.calibrate(model, inputs, method='rsparse') (it keeps the tokens the search uses); "
                 "or give rsparse_share a float in (0, 1], e.g. 0.95", CalibrationMissing if cal is None else WinaOptionError)

    def plan(self, config, sites: list[LinearSite]) -> Plan:
        splits, gates, rows, recipes = {}, {}, [], []
        for index, site in enumerate(sites):
            target = config.sparsity_for(site.name)
            reason = dense_reason(config, site, target)
            if reason is None and site.expert is not None:
                reason = "rsparse has no low-rank split of an expert weight yet"
            if reason is None and config.rsparse_share == "search" and site.name not in config.calibration.samples:
                reason = "no calibration tokens for it (R-Sparse's search needs them)"
            if reason is None:
                splits[index], recipe = _split(config, site, target)
                gates[index] = zero_skipping_gate(site)
                recipes.append(recipe)
                target = recipe.compute_sparsity(site.in_features, site.out_features)
            rows.append(row(site, reason, target))
        if not splits:
            return Plan(gates, rows)
        return Plan(gates, rows, lambda gm: split_low_rank(gm, splits, sites), _notes(recipes))


def _split(config, site: LinearSite, target: float) -> tuple[LowRankSplit, Recipe]:
    """The recipe for one linear (searched on calibration tokens, or the fixed share) and
    the split it gives: the keep rule and the rank-r factors of the weight's SVD."""
    cal, k = config.calibration, site.in_features
    f = factors(site.weight)
    threshold_for = None
    if config.selection == "threshold":
        threshold_for = lambda s: cal.threshold(site.name, s)  # noqa: E731
    if config.rsparse_share == "search":
        recipe = search(site.weight, cal.samples[site.name], target, f, threshold_for)
    else:
        recipe = budget_recipe(k, site.out_features, target, config.rsparse_share)
    rule = (KeepRule(k=recipe.channels) if threshold_for is None
            else keep_rule(config, site, recipe.channel_sparsity(k)))
    return LowRankSplit(f.scale, *f.low_rank(recipe.rank), rule), recipe


def _notes(recipes: list[Recipe]) -> list[str]:
    shares = Counter(r.share for r in recipes)
    searched = [r.error for r in recipes if r.error is not None]
    return [
        f"rsparse: {len(recipes)} linears split; sparse share: "
        + ", ".join(f"{share:g} x{count}" for share, count in sorted(shares.items(), reverse=True))
        + f"; rank {min(r.rank for r in recipes)}..{max(r.rank for r in recipes)}"
        + (f"; mean output error on calibration tokens {sum(searched) / len(searched):.3g}" if searched else ""),
        "rsparse: target = compute sparsity (kept channels + low-rank part); measured counts the kept channels only",
    ]
