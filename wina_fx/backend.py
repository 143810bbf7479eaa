"""The ``backend="wina"`` torch.compile backend.

dynamo graph -> [orthogonalize] -> find linears -> choose a keep rule per linear -> gate pass
-> Inductor.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from wina_fx.passes.find_linears import LinearSite, find_linears
from wina_fx.passes.gate import Gate, gate_linears
from wina_fx.passes.orthogonalize import orthogonalize

from .config import WinaConfig
from .methods import channel_scores, keep_count
from .report import Report, ReportRow, record


def plan_gates(config: WinaConfig, sites: list[LinearSite]) -> tuple[dict[int, Gate], list[ReportRow]]:
    """Decide, for every linear, its gate or the reason it stays dense."""
    gates: dict[int, Gate] = {}
    rows = []
    for index, site in enumerate(sites):
        target = config.sparsity_for(site.name)
        reason = dense_reason(config, site, target)
        if reason is None:
            score = channel_scores(config.method, site.weight)
            if config.selection == "topk":
                gates[index] = Gate(score, k=keep_count(site.in_features, target))
            else:
                gates[index] = Gate(score, threshold=config.calibration.threshold(site.name, target))
        rows.append(
            ReportRow(
                site.name,
                "sparse" if reason is None else f"dense: {reason}",
                target if reason is None else None,
                site.in_features,
                site.out_features,
            )
        )
    return gates, rows


def dense_reason(config: WinaConfig, site: LinearSite, target: float | None) -> str | None:
    """Why ``site`` stays dense under ``config``, or None if it is to be gated."""
    if site.problem is not None:
        return site.problem
    if config.method == "dense":
        return "method is 'dense'"
    if site.is_output_head:
        return "output head (logits projection)"
    if target is None:
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
    if config.selection == "threshold" and config.method != "dense":
        config.calibration.check_model(sites)
    gates, rows = plan_gates(config, sites)
    counts = None
    if config.measure and gates:
        device = next(iter(gates.values())).score.device
        counts = torch.zeros(len(sites), 2, dtype=torch.float64, device=device)
        for index, row in enumerate(rows):
            if index in gates:
                row.counts = counts[index]
    if gates:
        gate_linears(gm, gates, sites, counts)
    notes = prepass.notes if prepass is not None else []
    record(Report(rows, config.method, config.selection, list(notes), orthogonalize=prepass))
    return compile_graph(gm, example_inputs, config, mode)
