"""Gate the experts of mixture-of-experts ops: each row keeps the channels its expert's rule keeps.

An expert op (``find_linears``: a grouped or batched matmul over a 3-D expert weight) reads
every expert's weight at once, so its experts are gated together: before the op, its
input rows are masked, each row x_s by the keep rule of the expert e(s) it is routed to
(importance |x_s,i| * score_e,i, top-k or the expert's calibrated threshold), and the op
then multiplies the masked rows.  The op itself is left as it was (on every device it
still reads each routed expert's whole weight: no sparse expert kernel yet).

Invariant: every node but the expert ops named by ``gates`` (and the nodes inserted
before them) is left as it was; an expert op computes what it computed before on
x * m; with gates that keep every channel, the graph computes what it computed before.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import wina_fx.ops  # noqa: F401  (registers torch.ops.wina)
from wina_fx.kernels import reference

from .find_linears import LinearSite
from .graph_utils import add_constant, shared_constant


def zero_dropped(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with its dropped channels zeroed (``where``: a dropped NaN or inf never reaches y)."""
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def gate_experts(gm: fx.GraphModule, gates: dict, sites: list[LinearSite],
                 counts: torch.Tensor | None = None) -> dict[fx.Node, fx.Node]:
    """Mask the input of every expert op that has a gated expert in ``gates`` (by site
    index; each a ``Gate``); experts of the op without a gate keep every channel.  Returns
    {expert op: its masked input node}.  With ``counts``, a ``wina::count_expert_kept`` op
    adds each gated expert's kept and seen channel counts to counts[its site index]."""
    ops: dict[fx.Node, list[int]] = {}
    for index, site in enumerate(sites):
        if site.expert is not None:
            ops.setdefault(site.node, []).append(index)
    counts_node = None if counts is None else shared_constant(gm, "wina_counts", counts)
    masked = {}
    for node, indices in ops.items():
        gated = [i for i in indices if i in gates]
        if not gated:
            continue
        first = sites[indices[0]]
        rows, x = first.expert_rows, first.input
        topk = gates[gated[0]].rule.k is not None
        channels = first.in_features
        keep_all = float(channels) if topk else -float("inf")
        scores = torch.ones(rows.experts, channels, dtype=torch.float32, device=first.weight.device)
        keep = torch.full((rows.experts,), keep_all, dtype=torch.float32, device=first.weight.device)
        slots = [-1] * rows.experts
        for i in gated:
            rule = gates[i].rule
            scores[sites[i].expert] = gates[i].score.float()
            keep[sites[i].expert] = float(rule.k if topk else rule.threshold)
            slots[sites[i].expert] = i
        keep = keep.long() if topk else keep
        reader = first.reader  # the mask goes before it
        score_node = add_constant(gm, "wina_expert_score", scores, before=reader)
        keep_node = add_constant(gm, "wina_expert_keep", keep, before=reader)
        with gm.graph.inserting_before(reader):
            expert = gm.graph.call_function(reference.expert_of_rows, (rows.kind, rows.node, x, rows.experts))
            mask = gm.graph.call_function(reference.expert_keep_mask, (x, expert, score_node, keep_node, topk))
            xm = gm.graph.call_function(zero_dropped, (x, mask))
            if counts_node is not None:
                gm.graph.call_function(torch.ops.wina.count_expert_kept.default, (counts_node, slots, mask, expert))
        reader.replace_input_with(x, xm)
        masked[node] = xm
    gm.graph.lint()
    gm.recompile()
    return masked
