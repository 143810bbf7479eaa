"""The ``backend="wina"`` torch.compile backend.

dynamo graph -> [orthogonalize] -> find linears -> plan per method (a keep rule per linear,
and for cats / rsparse a graph rewrite the gates rely on) -> [CUDA: weights not yet stored
as W^T: re-lay them out on the first call, compile at the next] -> [rewrite] -> experts pass
(mixture-of-experts ops) -> gate pass -> [group siblings, CUDA] -> [one-token grouped-query
attention by sdpa's enable_gqa] -> Inductor.  A tensor-parallel
graph (DTensor weights) goes the same way up to the gate pass, its sparse ops running on the
local shards (``sharded.py``); before Inductor it is traced down to those shards
(``passes/localize.py``), and its siblings are grouped there.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.fx as fx

from wina_fx.passes.find_linears import LinearSite, unrecognized_weights
from wina_fx.passes.experts import gate_experts
from wina_fx.passes.gate import Gate, gate_linears
from wina_fx.passes.group import group_sibling_linears
from wina_fx.passes.localize import local_arguments, localize, sharded_inputs
from wina_fx.passes.prepare import prepare
from wina_fx.passes.sdpa_gqa import attend_grouped_heads
from wina_fx.passes import weight_layout

from . import early_launch
from . import sharded  # noqa: F401  (registers the wina ops' DTensor strategies)
from .config import WinaConfig
from .methods import Plan, get_method
from .report import Report, ReportRow, record


def plan(config: WinaConfig, sites: list[LinearSite]) -> Plan:
    """Decide, for every linear, how it is rewritten or the reason it stays dense: the
    plan of the method the config names."""
    return get_method(config.method).plan(config, sites)


def plan_gates(config: WinaConfig, sites: list[LinearSite]) -> tuple[dict[int, Gate], list[ReportRow]]:
    """(gates, report rows) of a method that only gates linears (wina, teal, dense)."""
    result = plan(config, sites)
    if result.rewrite is not None:
        raise ValueError(f"method {config.method!r} rewrites the graph before gating: use plan() and Plan.rewrite")
    return result.gates, result.rows


def compile_graph(gm: fx.GraphModule, example_inputs, config: WinaConfig, mode: str | None,
                  group_notes: list[str] | None = None):
    """Inductor (with the mode's settings, and programmatic dependent launch on sm_90+ unless
    option pdl is False: ``early_launch.py``) or, with inductor=False, the FX graph itself.
    A tensor-parallel graph is compiled over its local shards (``passes/localize.py``);
    given ``group_notes`` (its report's notes), its sibling sparse linears are merged there
    (the grouped op has no DTensor strategy)."""
    if not config.inductor:
        return gm.forward
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    mode = mode if mode not in (None, "default") else config.mode
    patches = list_mode_options(mode) if mode != "default" else {}
    launch_early = config.pdl and early_launch.wanted(example_inputs)
    if launch_early:
        patches = {**patches, **early_launch.INDUCTOR_PATCHES}
    with early_launch.gemvs_launched_early() if launch_early else contextlib.nullcontext():
        local = localize(gm, example_inputs)
        if local is None:
            return compile_fx(gm, example_inputs, config_patches=patches)
        local_inputs = [sharded.local(x) for x in example_inputs]
        if group_notes is not None:
            _note_groups(group_sibling_linears(local, local_inputs), group_notes)
        compiled = compile_fx(local, local_inputs, config_patches=patches)
    return local_arguments(compiled, sharded_inputs(example_inputs))


def wina_backend(gm: fx.GraphModule, example_inputs, options=None, mode: str | None = None):
    """torch.compile backend: rewrite linears into wina sparse-linear ops, then compile.

    ``options`` is validated first; a bad one raises ``ValueError`` before any work on
    the graph. The report of this call is ``wina_fx.last_report()``.
    """
    config = WinaConfig.from_options(options)
    prepass, sites = prepare(gm, example_inputs, *config.prepass)
    if get_method(config.method).reads_calibration(config):
        config.calibration.check_model(sites)
    result = plan(config, sites)
    for name, shape, reader in unrecognized_weights(gm, sites, example_inputs):
        result.rows.append(ReportRow(name, f"dense: not a linear this backend rewrites (read by {reader})", None,
                                     shape[-1], math.prod(shape) // shape[-1]))
    if config.prefill == "dense" and result.gates:
        result = _dense_prefill(result, sites)
    on_kernels, grouped, todo = _kernel_layout(config, sites, result)

    # the sparse ops of a tensor-parallel graph are grouped once it is traced to its local shards
    group_local = bool(grouped) and bool(sharded_inputs(example_inputs))
    report: list[Report] = []

    def rewrite():
        report.append(_rewrite(gm, example_inputs, config, prepass, sites, result, on_kernels,
                               set() if group_local else grouped))

    def compiled():
        return compile_graph(gm, example_inputs, config, mode, group_notes=report[0].notes if group_local else None)

    if todo:  # the model's parameters: once dynamo's guards are built
        return weight_layout.RelayoutFirst(todo, rewrite, gm, compiled)
    rewrite()
    return compiled()


def _kernel_layout(config: WinaConfig, sites: list[LinearSite], result: Plan):
    """(the kernels run, indices of the linears to group, the model's weights still to be
    stored as the kernels read them).  The graph's own weight constants (the prepass's)
    are re-laid out here and now; the model's parameters are left to ``RelayoutFirst``."""
    linear_gates = _linear_gates(result.gates, sites)
    on_kernels = bool(linear_gates) and weight_layout.kernels_read_rows(sites[next(iter(linear_gates))].weight)
    if any(weight_layout.trains(sites[i].weight) for i in linear_gates):
        # A training graph reads each weight as stored: a grouped op's weight is a view of
        # several parameters, through which no gradient would flow, and a re-layout mid
        # training would recompile the graph with scores taken from the updated weights.
        result.notes.append("training graph: weights read as stored (not grouped, not re-laid out)")
        return False, set(), []
    # a grouped op has no DTensor strategy: a tensor-parallel graph is grouped over its local
    # shards, after Inductor's tracing (compile_graph); op by op its linears run one by one
    groupable = config.group and on_kernels and (config.inductor or not any(
        sharded.is_sharded(sites[i].weight) for i in linear_gates))
    grouped = {i for i, g in linear_gates.items() if g.rule.k is None} if groupable else set()
    sets = weight_layout.sibling_sets(sites, grouped, set(linear_gates))
    lifted = [s for s in sets if any(_is_input(sites[i]) for i in s)]
    weight_layout.relayout(weight_layout.pending(sites, [s for s in sets if s not in lifted]))
    experts = weight_layout.expert_pending(sites, set(result.gates) - set(linear_gates))
    return on_kernels, grouped, weight_layout.pending(sites, lifted) + experts


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


def _linear_gates(gates: dict[int, Gate], sites: list[LinearSite]) -> dict[int, Gate]:
    """The gates of 2-D linears (the sparse ops); the experts of 3-D expert weights are
    gated by ``passes/experts.py``."""
    return {i: g for i, g in gates.items() if sites[i].expert is None}


def _is_input(site: LinearSite) -> bool:
    return site.weight_node is not None and site.weight_node.op == "placeholder"


def _rewrite(gm, example_inputs, config: WinaConfig, prepass, sites, result: Plan, on_kernels: bool,
             grouped: set[int]) -> Report:
    """Apply ``result`` (rewrite, gates, groups) to gm; record the report and return it."""
    gates, rows = result.gates, result.rows
    counts = None
    if config.measure and any(sharded.is_sharded(sites[i].weight) for i in gates):
        raise ValueError("wina-fx: option measure is not supported on a tensor-parallel (DTensor) graph yet; "
                         "measure the model in one process")
    if config.measure and gates:
        device = next(iter(gates.values())).score.device
        counts = torch.zeros(len(sites), 2, dtype=torch.float64, device=device)
        for index, row in enumerate(rows):
            if index in gates:
                row.counts = counts[index]
    inputs = result.rewrite(gm) if result.rewrite is not None else {}
    notes = list(prepass.notes if prepass is not None else []) + result.notes
    expert_ops = gate_experts(gm, gates, sites, counts)
    on_kernel = sum(n.target is torch.ops.wina.expert_threshold_linear.default for n in expert_ops.values())
    if on_kernel:
        notes.append(f"experts: {on_kernel} expert ops run as wina::expert_threshold_linear (each routed row "
                     "reads only its expert's kept rows of W_e^T)")
    if len(expert_ops) > on_kernel:
        notes.append(f"experts: the inputs of {len(expert_ops) - on_kernel} expert ops masked row by row by each "
                     "row's expert; those ops read each routed expert's whole weight (the sparse expert kernel "
                     "runs on CUDA, up to 16 routed rows)")
    gates = _linear_gates(gates, sites)
    if gates:
        copied = [sites[i].name for i in gates if weight_layout.needs_transposed_copy(sites[i])]
        gate_linears(gm, gates, sites, counts, inputs)
        if on_kernels:
            notes.append("weights: read in place as W^T (one copy)" if not copied else
                         f"weights: {len(copied)} sparse linears read a transposed copy (" + ", ".join(copied[:3]) + ")")
        # Grouping pays where the kernels run; on the CPU it would only add a concatenation.
        if grouped:
            _note_groups(group_sibling_linears(gm, example_inputs), notes)
    if config.sdpa_gqa:
        _note_gqa(*attend_grouped_heads(gm), notes)
    report = Report(rows, config.method, config.selection, list(notes), orthogonalize=prepass)
    record(report)
    return report


def _note_gqa(rewritten: int, left: dict[str, int], notes: list[str]) -> None:
    if rewritten:
        notes.append(f"attention: {rewritten} one-token attentions over grouped K/V heads read them unrepeated "
                     "(sdpa's enable_gqa; option sdpa_gqa)")
    for reason, count in left.items():
        notes.append(f"attention: {count} over repeated K/V heads left as traced ({reason})")


def _note_groups(groups: list[list[fx.Node]], notes: list[str]) -> None:
    if groups:
        notes.append(f"group: {sum(map(len, groups))} threshold linears sharing an input run as {len(groups)} launches")
