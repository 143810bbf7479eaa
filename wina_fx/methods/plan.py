"""What a method decides for a graph (a ``Plan``) and the pieces every planner shares.

A plan says, for every linear found in the graph, whether it is gated and by which keep
rule, or why it stays dense; a method that needs the graph changed first (CATS masks the
MLP's intermediate, R-Sparse adds a low-rank correction) also gives that rewrite.  The
backend applies the plan; the methods only decide it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.fx as fx

from wina_fx.passes.find_linears import LinearSite
from wina_fx.passes.find_mlps import find_gated_mlps
from wina_fx.passes.gate import Gate
from wina_fx.passes.keep_rule import KeepRule
from wina_fx.report import ReportRow


@dataclasses.dataclass
class Plan:
    """``rewrite`` (a graph pass the gates rely on, or None) runs first and returns the new
    input node of the linears whose input it masked; then the gate pass applies ``gates`` (by
    linear index). ``rows`` (one per linear) and ``notes`` go to the report."""

    gates: dict[int, Gate]
    rows: list[ReportRow]
    rewrite: Callable[[fx.GraphModule], dict[int, fx.Node]] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def keep_count(num_channels: int, sparsity: float) -> int:
    """Channels kept per token at ``sparsity`` (top-k): round((1 - s) * K), at least 1."""
    return max(1, round((1.0 - sparsity) * num_channels))


def keep_rule(config, site: LinearSite, target: float, channels: int | None = None,
              dense_prefix: float = 0.0) -> KeepRule:
    """The rule option ``selection`` asks for at sparsity ``target``: top-k (``channels``
    kept, by default keep_count(K, target)), or the calibrated threshold for ``target``."""
    if config.selection == "topk":
        k = channels if channels is not None else keep_count(site.in_features, target)
        return KeepRule(k=k, dense_prefix=dense_prefix)
    return KeepRule(threshold=config.calibration.threshold(site.name, target), sparsity=target,
                    dense_prefix=dense_prefix)


def dense_reason(config, site: LinearSite, target: float | None) -> str | None:
    """Why ``site`` stays dense under ``config`` at ``target``, or None if it is to be gated."""
    if site.dense_reason is not None:
        return site.dense_reason
    if target is None:
        if config.sparsity_allocation == "greedy":
            return "not in the calibration's greedy allocation"
        return "no pattern of option 'sparsity' matches its name"
    if config.selection == "threshold" and site.name not in config.calibration.names:
        return "no calibration statistics for it"
    return None


def row(site: LinearSite, reason: str | None, target: float | None, score: str | None = None) -> ReportRow:
    status = "sparse" if reason is None else f"dense: {reason}"
    return ReportRow(site.name, status, target if reason is None else None, site.in_features, site.out_features,
                     score=score if reason is None else None)


def zero_skipping_gate(site: LinearSite) -> Gate:
    """The gate of a linear whose input a rewrite has already masked: |x_i| * 1 > 0 keeps
    exactly the channels left nonzero, so the sparse op skips the zeroed ones."""
    return Gate(torch.ones(site.in_features, dtype=torch.float32, device=site.weight.device), KeepRule(threshold=0.0))


def plan_scored(method, config, sites: list[LinearSite]) -> Plan:
    """Each linear that can be gated keeps the channels of largest |x_i| * score_i, its
    score as the method and option ``recipe`` give it."""
    recipe = method.recipes[config.recipe]
    gates, rows = {}, []
    for index, site in enumerate(sites):
        target = config.sparsity_for(site.name)
        reason = dense_reason(config, site, target)
        label = None
        if reason is None:
            score, label = method.site_score(site, recipe)
            gates[index] = Gate(score, keep_rule(config, site, target, dense_prefix=recipe.dense_prefix))
        rows.append(row(site, reason, target, label))
    notes = []
    if recipe.shared_gate_up:
        notes = _share_gate_masks(gates, rows, sites)
    return Plan(gates, rows, notes=notes)


def _share_gate_masks(gates: dict[int, Gate], rows: list[ReportRow], sites: list[LinearSite]) -> list[str]:
    """The up projection of each gated MLP keeps what its gate keeps (same input, same score
    |x|, the gate's rule): one mask for both, as TEAL's code runs them."""
    shared = 0
    for mlp in find_gated_mlps(sites).values():
        if mlp.fused or mlp.gate not in gates or mlp.up not in gates:
            continue
        gates[mlp.up] = Gate(gates[mlp.gate].score, gates[mlp.gate].rule)
        rows[mlp.up] = dataclasses.replace(rows[mlp.up], target_sparsity=rows[mlp.gate].target_sparsity,
                                           score=f"{rows[mlp.gate].score}, the gate's mask")
        shared += 1
    return [f"recipe: {shared} up projections keep their gate's channels"] if shared else []
