"""The ``backend="wina"`` torch.compile backend.

dynamo graph -> [orthogonalize] -> find linears -> plan per method (a keep rule per linear,
and for cats / rsparse a graph rewrite the gates rely on) -> [CUDA: weights not yet stored
as W^T: re-lay them out on the first call, compile at the next] -> [rewrite] -> gate pass
-> [group siblings, CUDA] -> Inductor.
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx as fx

from wina_fx.passes.cats import CatsMask, mask_gated_mlps
from wina_fx.passes.find_linears import LinearSite, find_linears, unrecognized_weights
from wina_fx.passes.find_mlps import find_gated_mlps
from wina_fx.passes.gate import Gate, gate_linears
from wina_fx.passes.group import group_sibling_linears
from wina_fx.passes.low_rank import LowRankSplit, split_low_rank
from wina_fx.passes.orthogonalize import orthogonalize
from wina_fx.passes import weight_layout

from . import rsparse
from .config import WinaConfig
from .methods import channel_scores, keep_count
from .report import Report, ReportRow, record


@dataclasses.dataclass
class Plan:
    """What the backend does to a graph: ``rewrite`` (a graph pass the gates rely on, or
    None) runs first, then the gate pass with ``gates``; ``rows`` and ``notes`` go to the report."""

    gates: dict[int, Gate]
    rows: list[ReportRow]
    rewrite: Callable[[fx.GraphModule], object] | None = None
    notes: list[str] = dataclasses.field(default_factory=list)


def plan(config: WinaConfig, sites: list[LinearSite]) -> Plan:
    """Decide, for every linear, how it is rewritten or the reason it stays dense."""
    return PLANNERS[config.method](config, sites)


def plan_gates(config: WinaConfig, sites: list[LinearSite]) -> tuple[dict[int, Gate], list[ReportRow]]:
    """(gates, report rows) of the methods that only gate linears (wina, teal, dense)."""
    result = plan(config, sites)
    if result.rewrite is not None:
        raise ValueError(f"method {config.method!r} rewrites the graph before gating: use plan() and Plan.rewrite")
    return result.gates, result.rows


def _row(site: LinearSite, reason: str | None, target: float | None) -> ReportRow:
    status = "sparse" if reason is None else f"dense: {reason}"
    return ReportRow(site.name, status, target if reason is None else None, site.in_features, site.out_features)


def _zero_skipping_gate(site: LinearSite) -> Gate:
    """The gate of a linear whose input a rewrite has already masked: |x_i| * 1 > 0 keeps
    exactly the channels left nonzero, so the sparse op skips the zeroed ones."""
    return Gate(torch.ones(site.in_features, dtype=torch.float32, device=site.weight.device), threshold=0.0)


def _plan_scored(config: WinaConfig, sites: list[LinearSite]) -> Plan:
    """wina, teal (and dense): each linear keeps the channels of largest |x_i| * score_i."""
    gates, rows = {}, []
    for index, site in enumerate(sites):
        target = config.sparsity_for(site.name)
        reason = dense_reason(config, site, target)
        if reason is None:
            score = channel_scores(config.method, site.weight)
            if config.selection == "topk":
                gates[index] = Gate(score, k=keep_count(site.in_features, target))
            else:
                gates[index] = Gate(score, threshold=config.calibration.threshold(site.name, target), sparsity=target)
        rows.append(_row(site, reason, target))
    return Plan(gates, rows)


CATS_ONLY_MLP = "cats sparsifies only the MLP (not the down projection of a gated MLP act(gate(x)) * up(x))"


def _plan_cats(config: WinaConfig, sites: list[LinearSite]) -> Plan:
    """cats: in each gated MLP, mask the down projection's input by |act(gate(x))|; the
    sparsity of an MLP is the one its down projection's name gets."""
    mlps = find_gated_mlps(sites)
    roles = {}
    for mlp in mlps.values():
        if mlp.fused:
            roles[mlp.gate] = "cats computes the fused gate/up projection dense (its gate half decides the mask)"
        else:
            roles[mlp.gate] = "cats computes the gate projection dense (its output decides the mask)"
            roles[mlp.up] = "cats masks its output rows but computes them dense (no row-skipping op yet)"
    masks, gates, rows = {}, {}, []
    for index, site in enumerate(sites):
        if index in mlps:
            target = config.sparsity_for(site.name)
            reason = dense_reason(config, site, target)
        else:
            target = None
            reason = unsupported_reason(config, site) or roles.get(index, CATS_ONLY_MLP)
        if reason is None:
            if config.selection == "topk":
                masks[index] = CatsMask(k=keep_count(site.in_features, target))
            else:
                masks[index] = CatsMask(threshold=config.calibration.threshold(site.name, target))
            gates[index] = _zero_skipping_gate(site)
        rows.append(_row(site, reason, target))
    rewrite = (lambda gm: mask_gated_mlps(gm, masks, mlps, sites)) if masks else None
    return Plan(gates, rows, rewrite)


def _plan_rsparse(config: WinaConfig, sites: list[LinearSite]) -> Plan:
    """rsparse: each linear keeps the channels of largest |x_i| * ||W[:, i]||_2 exactly and
    corrects the rest with a rank-r part of W's SVD, at the compute of plain sparsity."""
    splits, gates, rows, recipes = {}, {}, [], []
    for index, site in enumerate(sites):
        target = config.sparsity_for(site.name)
        reason = dense_reason(config, site, target)
        if reason is None and config.rsparse_share == "search" and site.name not in config.calibration.samples:
            reason = "no calibration tokens for it (R-Sparse's search needs them)"
        if reason is None:
            splits[index], recipe = _rsparse_split(config, site, target)
            gates[index] = _zero_skipping_gate(site)
            recipes.append(recipe)
            target = recipe.compute_sparsity(site.in_features, site.out_features)
        rows.append(_row(site, reason, target))
    if not splits:
        return Plan(gates, rows)
    shares = Counter(r.share for r in recipes)
    searched = [r.error for r in recipes if r.error is not None]
    notes = [
        f"rsparse: {len(recipes)} linears split; sparse share: "
        + ", ".join(f"{share:g} x{count}" for share, count in sorted(shares.items(), reverse=True))
        + f"; rank {min(r.rank for r in recipes)}..{max(r.rank for r in recipes)}"
        + (f"; mean output error on calibration tokens {sum(searched) / len(searched):.3g}" if searched else ""),
        "rsparse: target = compute sparsity (kept channels + low-rank part); measured counts the kept channels only",
    ]
    return Plan(gates, rows, lambda gm: split_low_rank(gm, splits, sites), notes)


def _rsparse_split(config: WinaConfig, site: LinearSite, target: float) -> tuple[LowRankSplit, rsparse.Recipe]:
    """R-Sparse's recipe for one linear (searched on calibration tokens, or the fixed share)
    and the split it gives: the keep rule and the rank-r factors of the weight's SVD."""
    cal, k = config.calibration, site.in_features
    factors = rsparse.factors(site.weight)
    threshold_for = None
    if config.selection == "threshold":
        threshold_for = lambda s: cal.threshold(site.name, s)  # noqa: E731
    if config.rsparse_share == "search":
        recipe = rsparse.search(site.weight, cal.samples[site.name], target, factors, threshold_for)
    else:
        recipe = rsparse.budget_recipe(k, site.out_features, target, config.rsparse_share)
    if threshold_for is None:
        rule = {"k": recipe.channels}
    else:
        rule = {"threshold": threshold_for(recipe.channel_sparsity(k))}
    return LowRankSplit(factors.scale, *factors.low_rank(recipe.rank), **rule), recipe


PLANNERS = {"wina": _plan_scored, "teal": _plan_scored, "dense": _plan_scored, "cats": _plan_cats, "rsparse": _plan_rsparse}


def unsupported_reason(config: WinaConfig, site: LinearSite) -> str | None:
    """Why ``site`` stays dense whatever its sparsity (no weight, method dense, output head)."""
    if site.problem is not None:
        return site.problem
    if config.method == "dense":
        return "method is 'dense'"
    if site.is_output_head:
        return "output head (logits projection)"
    if site.is_router:
        return "router (its output selects or gates experts; few bytes, and routing must not change)"
    return None


def dense_reason(config: WinaConfig, site: LinearSite, target: float | None) -> str | None:
    """Why ``site`` stays dense under ``config``, or None if it is to be gated."""
    reason = unsupported_reason(config, site)
    if reason is not None:
        return reason
    if target is None:
        if config.sparsity_allocation == "greedy":
            return "not in the calibration's greedy allocation"
        return "no pattern of option 'sparsity' matches its name"
    if config.selection == "threshold" and site.name not in config.calibration.names:
        return "no calibration statistics for it"
    return None


def compile_graph(gm: fx.GraphModule, example_inputs, config: WinaConfig, mode: str | None):
    """Inductor (with the mode's settings) or, with inductor=False, the FX graph itself."""
    if not config.inductor:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    mode = mode if mode not in (None, "default") else config.mode
    patches = list_mode_options(mode) if mode != "default" else {}
    return compile_fx(gm, example_inputs, config_patches=patches)


def wina_backend(gm: fx.GraphModule, example_inputs, options=None, mode: str | None = None):
    """torch.compile backend: rewrite linears into wina sparse-linear ops, then compile.

    ``options`` is validated first; a bad one raises ``ValueError`` before any work on
    the graph. The report of this call is ``wina_fx.last_report()``.
    """
    config = WinaConfig.from_options(options)
    prepass = None
    if config.orthogonalize is not None:
        # Rewrites gm only: its transformed weights are new constants, the model's stay.
        prepass = orthogonalize(gm, example_inputs, config.orthogonalize)
    sites = find_linears(gm, example_inputs)
    searched = config.method == "rsparse" and config.rsparse_share == "search"
    greedy = config.sparsity_allocation == "greedy"
    if (config.selection == "threshold" or searched or greedy) and config.method != "dense":
        config.calibration.check_model(sites)
    result = plan(config, sites)
    for name, shape, reader in unrecognized_weights(gm, sites, example_inputs):
        result.rows.append(ReportRow(name, f"dense: not a linear this backend rewrites (read by {reader})", None,
                                     shape[-1], math.prod(shape) // shape[-1]))
    if config.prefill == "dense" and result.gates:
        result = _dense_prefill(result, sites)
    on_kernels, grouped, todo = _kernel_layout(config, sites, result)

    def rewrite():
        _rewrite(gm, example_inputs, config, prepass, sites, result, on_kernels, grouped)

    if todo:  # the model's parameters: once dynamo's guards are built
        return weight_layout.RelayoutFirst(todo, rewrite, gm, lambda: compile_graph(gm, example_inputs, config, mode))
    rewrite()
    return compile_graph(gm, example_inputs, config, mode)


def _kernel_layout(config: WinaConfig, sites: list[LinearSite], result: Plan):
    """(the kernels run, indices of the linears to group, the model's weights still to be
    stored as the kernels read them).  The graph's own weight constants (the prepass's)
    are re-laid out here and now; the model's parameters are left to ``RelayoutFirst``."""
    on_kernels = bool(result.gates) and weight_layout.kernels_read_rows(sites[next(iter(result.gates))].weight)
    if any(weight_layout.trains(sites[i].weight) for i in result.gates):
        # A training graph reads each weight as stored: a grouped op's weight is a view of
        # several parameters, through which no gradient would flow, and a re-layout mid
        # training would recompile the graph with scores taken from the updated weights.
        result.notes.append("training graph: weights read as stored (not grouped, not re-laid out)")
        return False, set(), []
    grouped = {i for i, g in result.gates.items() if g.k is None} if config.group and on_kernels else set()
    sets = weight_layout.sibling_sets(sites, grouped, set(result.gates))
    lifted = [s for s in sets if any(_is_input(sites[i]) for i in s)]
    weight_layout.relayout(weight_layout.pending(sites, [s for s in sets if s not in lifted]))
    return on_kernels, grouped, weight_layout.pending(sites, lifted)


def new_tokens(node: fx.Node) -> int | None:
    """Tokens per sequence in a linear's input (B, T, K) as traced: T, or None when
    symbolic.  Dynamo specializes sizes 0 and 1, so a symbolic T means T >= 2.  A 2-D
    input (tokens, K) counts its rows (a batch of single tokens flattened looks like a
    prefill: it stays dense under prefill='dense')."""
    value = node.meta.get("example_value", node.meta.get("val"))
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    tokens = shape[-2]
    return tokens if isinstance(tokens, int) else None


def _dense_prefill(result: Plan, sites: list[LinearSite]) -> Plan:
    """prefill='dense': a graph whose steps carry more than one new token per sequence keeps
    every linear dense (no gate, no rewrite); a one-token step keeps its plan."""
    tokens = new_tokens(sites[next(iter(result.gates))].input)
    if tokens == 1:
        return dataclasses.replace(result, notes=result.notes + ["prefill='dense': a one-token step, sparse"])
    reason = f"prefill step ({tokens or '>= 2'} tokens per sequence; option prefill='dense')"
    rows = [dataclasses.replace(row, status=f"dense: {reason}", target_sparsity=None) if i in result.gates else row
            for i, row in enumerate(result.rows)]
    return Plan({}, rows, None, result.notes + [f"prefill='dense': {reason}: every linear dense"])


def _is_input(site: LinearSite) -> bool:
    return site.weight_node is not None and site.weight_node.op == "placeholder"


def _rewrite(gm, example_inputs, config: WinaConfig, prepass, sites, result: Plan, on_kernels: bool,
             grouped: set[int]) -> None:
    """Apply ``result`` (rewrite, gates, groups) to gm and record the report."""
    gates, rows = result.gates, result.rows
    counts = None
    if config.measure and gates:
        device = next(iter(gates.values())).score.device
        counts = torch.zeros(len(sites), 2, dtype=torch.float64, device=device)
        for index, row in enumerate(rows):
            if index in gates:
                row.counts = counts[index]
    if result.rewrite is not None:
        result.rewrite(gm)
    notes = list(prepass.notes if prepass is not None else []) + result.notes
    if gates:
        copied = [sites[i].name for i in gates if weight_layout.needs_transposed_copy(sites[i])]
        gate_linears(gm, gates, sites, counts)
        if on_kernels:
            notes.append("weights: read in place as W^T (one copy)" if not copied else
                         f"weights: {len(copied)} sparse linears read a transposed copy (" + ", ".join(copied[:3]) + ")")
        # Grouping pays where the kernels run; on the CPU it would only add a concatenation.
        if grouped:
            groups = group_sibling_linears(gm, example_inputs)
            if groups:
                notes.append(f"group: {sum(map(len, groups))} threshold linears sharing an input run as "
                             f"{len(groups)} launches")
    record(Report(rows, config.method, config.selection, list(notes), orthogonalize=prepass))
