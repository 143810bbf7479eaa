"""Gate the experts of mixture-of-experts ops: each row keeps the channels its expert's rule keeps.

An expert op (``find_linears``: a grouped or batched matmul over a 3-D expert weight) reads
every expert's weight at once, so its experts are gated together: before the op, its
input rows are masked, each row x_s by the keep rule of the expert e(s) it is routed to
(importance |x_s,i| * score_e,i, top-k or the expert's calibrated threshold), and the op
then multiplies the masked rows, reading each routed expert's whole weight.

Invariant: every node but the expert ops named by ``gates`` (and the nodes inserted
before them) is left as it was; an expert op computes what it computed before on
x * m; with gates that keep every channel, the graph computes what it computed before.

On CUDA, for a decode-sized op (at most EXPERT_KERNEL_MAX_ROWS rows, fixed when traced),
the op is replaced by ``wina::expert_threshold_linear``: one GEMV launch in which each row
reads only the kept rows of its expert's W_e^T (the backend has stored the 3-D weight so, in
place); threshold rules run in the kernel, top-k masks x first and the kernel skips the
zeroed channels.  Elsewhere the op stays and reads its input masked.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import wina_fx.ops  # noqa: F401  (registers torch.ops.wina)
from wina_fx.kernels import reference

from . import weight_layout
from .find_linears import LinearSite
from .graph_utils import add_constant, shared_constant

EXPERT_KERNEL_MAX_ROWS = 16  # routed rows (tokens x top-k) up to which the GEMV kernel runs them


def gate_experts(gm: fx.GraphModule, gates: dict, sites: list[LinearSite],
                 counts: torch.Tensor | None = None) -> dict[fx.Node, fx.Node]:
    """Gate every expert op that has a gated expert in ``gates`` (by site index; each a
    ``Gate``); experts of the op without a gate keep every channel.  Returns {expert op:
    the node now standing for it: its masked input, or the ``wina::expert_threshold_linear``
    that replaced it}.  With ``counts``, a ``wina::count_expert_kept`` op adds each gated
    expert's kept and seen channel counts to counts[its site index]."""
    ops: dict[fx.Node, list[int]] = {}
    for index, site in enumerate(sites):
        if site.expert is not None:
            ops.setdefault(site.node, []).append(index)
    counts_node = None if counts is None else shared_constant(gm, "wina_counts", counts)
    done = {}
    for node, indices in ops.items():
        gated = {i: gates[i] for i in indices if i in gates}
        if gated:
            done[node] = _gate_op(gm, node, sites[indices[0]], gated, sites, counts_node)
    gm.graph.lint()
    gm.recompile()
    return done


def rule_tables(experts: int, channels: int, rules: dict, topk: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (E, K), keep (E,)): the inputs of ``reference.expert_keep_mask`` for
    ``rules`` {expert: (its (K,) score, its k or threshold)}; an expert without a rule keeps
    every channel (score 1, k = K or threshold -inf)."""
    scores = torch.ones(experts, channels, dtype=torch.float32, device=device)
    keep = torch.full((experts,), float(channels) if topk else -float("inf"), dtype=torch.float32, device=device)
    for e, (score, value) in rules.items():
        scores[e] = score.float()
        keep[e] = float(value)
    return scores, keep.long() if topk else keep


def _rule_tables(first: LinearSite, gated: dict, sites: list[LinearSite], topk: bool):
    """(scores (E, K), keep (E,): k per expert or its threshold, count slots (E,)) of one op."""
    rules = {sites[i].expert: (g.score, g.rule.k if topk else g.rule.threshold) for i, g in gated.items()}
    slots = [-1] * first.expert_rows.experts
    for i in gated:
        slots[sites[i].expert] = i
    return (*rule_tables(first.expert_rows.experts, first.in_features, rules, topk, first.weight.device), slots)


def _gate_op(gm, node, first: LinearSite, gated: dict, sites: list[LinearSite], counts_node) -> fx.Node:
    rules = [g.rule for g in gated.values()]
    topk = rules[0].k is not None
    scores, keep, slots = _rule_tables(first, gated, sites, topk)
    rows, x, reader = first.expert_rows, first.input, first.reader  # the mask goes before reader
    score_node = add_constant(gm, "wina_expert_score", scores, before=reader)
    keep_node = add_constant(gm, "wina_expert_keep", keep, before=reader)
    kernel = _runs_on_kernels(first)
    with gm.graph.inserting_before(reader):
        expert = gm.graph.call_function(reference.expert_of_rows, (rows.kind, rows.node, x, rows.experts))
        if counts_node is not None or not kernel or topk:
            mask = gm.graph.call_function(reference.expert_keep_mask, (x, expert, score_node, keep_node, topk))
        if counts_node is not None:
            gm.graph.call_function(torch.ops.wina.count_expert_kept.default, (counts_node, slots, mask, expert))
        xm = gm.graph.call_function(reference.zero_dropped, (x, mask)) if not kernel or topk else x
    if not kernel:
        reader.replace_input_with(x, xm)
        return xm
    if topk:  # x masked in torch ops; the kernel skips the zeroed channels (|x| * 1 > 0)
        hint = 1.0 - max(r.k for r in rules) / first.in_features
        score_node = add_constant(gm, "wina_expert_score", torch.ones_like(scores), before=reader)
        keep_node = add_constant(gm, "wina_expert_keep", torch.zeros_like(scores[:, 0]), before=reader)
    else:
        hint = min(float(r.sparsity or 0.0) for r in rules)
    return _replace_by_kernel(gm, node, first, reader, xm, expert, score_node, keep_node, hint)


def _runs_on_kernels(site: LinearSite) -> bool:
    """The expert op's rows can run on the sparse GEMV kernel: CUDA, inference, W_e^T rows
    contiguous in place, and a decode-sized row count fixed at trace time."""
    rows = site.input.meta.get("val", site.input.meta.get("example_value"))
    count = rows.shape[0] if rows is not None and rows.dim() == 2 else None
    return (isinstance(count, int) and count <= EXPERT_KERNEL_MAX_ROWS and weight_layout.kernels_read_rows(site.stacked)
            and not weight_layout.trains(site.stacked)
            and weight_layout.has_expert_row_layout(site.stacked, site.weight_is_transposed))


def _replace_by_kernel(gm, node, site: LinearSite, reader, x, expert, score_node, keep_node,
                       hint: float) -> fx.Node:
    """Replace the expert op by ``wina::expert_threshold_linear`` on rows ``x`` (its output in
    the op's shape); the op's weight gather and x view go if nothing else reads them."""
    with gm.graph.inserting_before(node):
        weight_t = site.weight_node if site.weight_is_transposed else \
            gm.graph.call_method("transpose", (site.weight_node, 1, 2))
        y = gm.graph.call_function(torch.ops.wina.expert_threshold_linear.default,
                                   (x, expert, weight_t, score_node, keep_node, hint))
        out = y
        if reader is not node:  # bmm(W[ids], x[..., None]) is (S, N, 1); bmm(x[:, None], W[ids]) (S, 1, N)
            out = gm.graph.call_method("unsqueeze", (y, -1 if node.args[1] is reader else 1))
    out.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")})
    operands = node.all_input_nodes
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    for operand in operands:  # the gathered weights W[ids] (a copy of whole experts) and x[..., None]
        if not operand.users and operand.op in ("call_function", "call_method"):
            gm.graph.erase_node(operand)
    return y
