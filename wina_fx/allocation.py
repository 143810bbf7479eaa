"""Layer-specific sparsity: TEAL's block-wise greedy allocation, on the FX graph.

For each transformer block, every gated linear starts at sparsity 0; step by step, the
linear whose next step adds the least error to the block's output on calibration data
takes that step, until the block's size-weighted mean sparsity (weights: in * out
features) reaches the largest target. Each target then reads its allocation off this one
path (TEAL: ``teal/greedyopt.py`` writes the path, ``get_layer_greedy_sparsities`` reads it).

It works on the graph the wina backend gates, after the same optional orthogonalization
prepass, so it scores exactly the linears, weights and activations the backend sees:

* the graph runs once, dense, on the calibration tokens (an ``fx.Interpreter``), keeping the
  values every block reads from outside itself and the dense value of its output;
* a **block** is the set of linears whose names share the prefix up to their first numeric
  component ("model.layers.3.mlp.down_proj" -> "model.layers.3"); a linear with no numeric
  component is a block of its own. Only linears the backend would gate are allocated
  (not the output head, nor linears with a problem): those stay dense and absent here;
* a block's **output** is the first add (in graph order) that depends on every one of its
  linears, before the next block's first linear: the residual add closing the block (after
  down_proj in a Llama layer; the attention's residual add depends on q, k, v, o only).
  Without such an add, the first node that depends on all of them;
* a block's **nodes** are its linears and every node that depends on one of them and feeds
  its output. Only those are re-evaluated; everything else they read (the block's input
  hidden state, rotary tables, masks, weights) is the recorded dense value, so every block
  is scored from the dense model's input, as TEAL does. Raising linear j re-evaluates only
  j and what depends on it;
* a gated linear computes ``kernels.reference.masked_linear`` with the top-k mask of its
  method's ``channel_scores`` and k = ``keep_count(K, s)``: the backend's top-k rule (the
  same channels as ``reference.topk_mask`` up to ties; ``topk_mask`` below is faster).
  An expert of a 3-D expert weight is a linear of its block too: its op (or the node
  reading x for it) is re-run on rows masked by their routed expert's rule
  (``reference.expert_keep_mask``), as ``passes/experts.py`` masks them.

Parameters (TEAL, arXiv 2408.14690, FasterDecoding/TEAL ``teal/greedyopt.py``):
``step``: TEAL's ``base_step_size`` is 0.05 (``TEAL_STEP``); the default here is 0.1, half
the cost for a small loss (measured in benchmarks/NOTES.md, allocation_smollm2*.json).
Linear i moves by step * ref / size_i, where ref is the median linear size of the block (for
Llama-like blocks the q/o size, TEAL's unit in its ``weight_dict``), so every step skips the
same number of weights. A linear stops below sparsity 1. Error: relative squared error of the block output against
dense, ||y - y_dense||^2 / ||y_dense||^2, summed over every calibration token (TEAL takes
the L2 distance of the last quarter of each sequence, because its prefill leaves the first
half dense; the backend gates every token, so every token counts here).

Invariant: for every target t and every block, sum_i size_i * s_i / sum_i size_i == t up to
float rounding (TEAL takes the path point nearest to t; here the last step is taken only in
part, so each block, and thus the model, meets t exactly), and every s_i is in [0, 1).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from wina_fx import sharded
from wina_fx.kernels import reference
from wina_fx.passes.experts import rule_tables
from wina_fx.passes.find_linears import LinearSite
from wina_fx.passes.prepare import prepare

from .methods import get_method, keep_count, method_names
from .options import orthogonalize_variant

DEFAULT_TARGETS = (0.25, 0.4, 0.5, 0.65)
TEAL_STEP = 0.05  # TEAL's base_step_size
DEFAULT_STEP = 0.1  # half TEAL's cost; see the module docstring
_ADDS = (operator.add, operator.iadd, torch.add, torch.Tensor.add, torch.ops.aten.add.Tensor)
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def block_name(linear_name: str) -> str:
    """The block a linear belongs to: its name up to the first numeric component."""
    match = _BLOCK.match(linear_name)
    return match.group(1) if match else linear_name


def check_targets(targets: Iterable[float], where: str = "allocation_targets") -> list[float]:
    """Sorted, de-duplicated target sparsities, each a float in [0, 1); else ValueError."""
    if isinstance(targets, (int, float)):
        targets = [targets]
    checked = set()
    for t in targets:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= float(t) < 1.0:
            raise ValueError(f"{where}: every target must be a float in [0, 1), got {t!r}")
        checked.add(round(float(t), 6))
    if not checked:
        raise ValueError(f"{where}: give at least one target sparsity in [0, 1), e.g. [0.5]")
    return sorted(checked)


def check_step(step: float) -> float:
    """``step`` if it is a float in (0, 1); else ValueError."""
    if isinstance(step, bool) or not isinstance(step, (int, float)) or not 0.0 < step < 1.0:
        raise ValueError(f"allocation step must be a float in (0, 1) (TEAL uses {TEAL_STEP}), got {step!r}")
    return float(step)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADDS
    return node.op == "call_method" and node.target in ("add", "add_", "__add__")


@dataclasses.dataclass
class Block:
    """One block of one graph: its gated linears, output node and the nodes re-evaluated."""

    name: str
    sites: list[LinearSite]
    output: fx.Node
    nodes: list[fx.Node]  # graph order: linears and their dependants that feed the output
    downstream: list[list[fx.Node]]  # per site: the nodes that change when its sparsity does
    frontier: set[fx.Node]  # what the block reads from outside itself, and its output (the reference)

    @property
    def key(self) -> tuple:
        return (self.name, tuple(s.name for s in self.sites))

    @property
    def sizes(self) -> list[int]:
        return [s.in_features * s.out_features for s in self.sites]


def find_blocks(gm: fx.GraphModule, sites: Sequence[LinearSite]) -> list[Block]:
    """Group ``sites`` (the linears to allocate) into blocks and find each block's nodes."""
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    groups: dict[str, list[LinearSite]] = {}
    for site in sorted(sites, key=lambda s: position[s.reader]):
        groups.setdefault(block_name(site.name), []).append(site)
    starts = sorted(position[g[0].reader] for g in groups.values())
    blocks = []
    for name, members in groups.items():
        following = [p for p in starts if p > position[members[-1].reader]]
        output, depends = _block_output(gm, members, position, following[0] if following else len(position))
        if output is None:
            raise ValueError(
                f"allocation: block {name!r} has no node that depends on all of its linears "
                f"({', '.join(s.name for s in members)}) before the next block starts"
            )
        # The block's nodes: those depending on its linears that feed its output.
        feeding, stack = set(), [output]
        while stack:
            node = stack.pop()
            if node in feeding or node not in depends:
                continue
            feeding.add(node)
            stack.extend(node.all_input_nodes)
        # in-place writes into a tensor the block itself creates (grouped_mm's inverse
        # permutation: inv[perm] = arange) are part of computing it: re-run them too
        feeding |= {n for n in depends if _mutates(n) and n.args and n.args[0] in feeding}
        nodes = sorted(feeding, key=position.__getitem__)
        for node in nodes:
            if _mutates(node) and not (node.args and node.args[0] in feeding):
                raise ValueError(
                    f"allocation: block {name!r} has the in-place op {node.format_node()}; "
                    "re-evaluating it would change recorded values"
                )
        downstream = []
        for site in members:
            changed = {site.reader}
            for node in nodes:
                if any(a in changed for a in node.all_input_nodes):
                    changed.add(node)
            downstream.append([n for n in nodes if n in changed])
        frontier = {a for n in nodes for a in n.all_input_nodes if a not in feeding}
        blocks.append(Block(name, members, output, nodes, downstream, frontier | {output}))
    return blocks


def _block_output(gm: fx.GraphModule, members: list[LinearSite], position: dict, limit: int):
    """(output, nodes depending on a linear of ``members``) of a block: the first add that
    depends on every one of its linears, before position ``limit``; failing that, the first
    node that does; None if no node does."""
    bits: dict[fx.Node, int] = {}  # reader -> bitmask of the linears whose sparsity changes it
    for i, site in enumerate(members):
        bits[site.reader] = bits.get(site.reader, 0) | (1 << i)
    full = (1 << len(members)) - 1
    reach: dict[fx.Node, int] = {}  # node -> bitmask of the block's linears it depends on
    first_full = None
    for node in gm.graph.nodes:
        if position[node] < position[members[0].reader]:
            continue
        if position[node] >= limit:
            break
        mask = bits.get(node, 0)
        for arg in node.all_input_nodes:
            mask |= reach.get(arg, 0)
        if not mask:
            continue
        reach[node] = mask
        if mask == full:
            if _is_add(node):
                return node, set(reach)
            first_full = first_full or node
    return first_full, set(reach)


def _mutates(node: fx.Node) -> bool:
    """An in-place op (``add_``, ``x[i] = v``), which would change values kept for replay."""
    if node.op == "call_function" and node.target is operator.setitem:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and name.endswith("_") and not name.endswith("__")


class _Recorder(fx.Interpreter):
    """Runs the graph dense and keeps the values of ``keep``."""

    def __init__(self, gm: fx.GraphModule, keep: set[fx.Node]):
        super().__init__(gm)
        self.keep = keep
        self.values: dict[fx.Node, object] = {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node in self.keep:
            self.values[node] = value.detach() if isinstance(value, torch.Tensor) else value
        return value


class _Evaluator(fx.Interpreter):
    """Re-evaluates a block's nodes with its linears gated by top-k."""

    def __init__(self, gm: fx.GraphModule, block: Block, method: str, recipe: str = "default"):
        super().__init__(gm, garbage_collect_values=False)
        self.block = block
        self.index = {s.node: i for i, s in enumerate(block.sites) if s.expert is None}
        self.experts: dict[fx.Node, list[int]] = {}  # expert op's reader -> its experts' indices
        for i, s in enumerate(block.sites):
            if s.expert is not None:
                self.experts.setdefault(s.reader, []).append(i)
        chosen = get_method(method)
        self.scores = [chosen.site_score(s, chosen.recipes[recipe])[0].to(s.weight.device) for s in block.sites]

    def evaluate(self, env: dict, nodes: list[fx.Node], sparsities: Sequence[float]) -> dict:
        self.env = env
        for node in nodes:
            i = self.index.get(node)
            experts = [j for j in self.experts.get(node, ()) if sparsities[j] > 0.0]
            if experts:
                env[node] = self._run_masked_experts(node, experts, sparsities)
            elif i is None or sparsities[i] == 0.0:
                env[node] = self.run_node(node)
            else:
                site = self.block.sites[i]
                x = env[site.input]
                mask = topk_mask(x, self.scores[i], keep_count(site.in_features, sparsities[i]))
                env[node] = reference.masked_linear(x, site.weight, self._bias(site, env), mask)
        return env

    def _run_masked_experts(self, reader: fx.Node, experts: list[int], sparsities: Sequence[float]):
        """``reader`` run on its input rows masked by their routed experts' top-k rules."""
        first = self.block.sites[experts[0]]
        rows, x_node = first.expert_rows, first.input
        x = self.env[x_node]
        rules = {self.block.sites[j].expert: (self.scores[j], keep_count(first.in_features, sparsities[j]))
                 for j in experts}
        scores, keep = rule_tables(rows.experts, x.shape[-1], rules, True, x.device)
        expert = reference.expert_of_rows(rows.kind, self.env[rows.node], x, rows.experts)
        mask = reference.expert_keep_mask(x, expert, scores, keep, topk=True)
        self.env[x_node] = reference.zero_dropped(x, mask)
        try:
            return self.run_node(reader)
        finally:
            self.env[x_node] = x

    def _bias(self, site: LinearSite, env: dict):
        if site.node.op == "call_module":
            return self.fetch_attr(site.node.target).bias
        return env[site.bias_node] if isinstance(site.bias_node, fx.Node) else site.bias_node


def topk_mask(x: torch.Tensor, score: torch.Tensor, k: int) -> torch.Tensor:
    """``reference.topk_mask`` (the same k channels per token, up to ties), faster where k
    is more than half the channels: it finds the K - k channels to drop instead."""
    num_channels = x.shape[-1]
    if k >= num_channels or 2 * k <= num_channels:
        return reference.topk_mask(x, score, k)
    dropped = reference.importance(x, score).topk(num_channels - k, dim=-1, largest=False).indices
    return torch.ones_like(x, dtype=torch.bool).scatter_(-1, dropped, False)


def _squared_error(out, dense) -> tuple[float, float]:
    diff = (out.double() - dense.double()).pow(2).sum()
    return float(diff), float(dense.double().pow(2).sum())


@dataclasses.dataclass
class BlockPath:
    """The greedy path of one block: sparsities after each step and the error it reached."""

    names: list[str]
    sizes: list[int]
    steps: list[float]
    counts: list[list[int]]  # per point of the path: steps taken by each linear
    errors: list[float]

    def sparsities(self, point: int) -> list[float]:
        return [c * s for c, s in zip(self.counts[point], self.steps)]

    def mean(self, point: int) -> float:
        return sum(s * n for s, n in zip(self.sparsities(point), self.sizes)) / sum(self.sizes)

    def allocation(self, target: float) -> dict[str, float]:
        """Per-linear sparsities whose size-weighted mean is ``target``: the path up to the
        first point reaching it, with the last step taken only in part."""
        point = next((p for p in range(len(self.counts)) if self.mean(p) >= target - 1e-12), None)
        if point is None:
            raise ValueError(f"allocation: the greedy path ends at mean sparsity {self.mean(-1):.3f} < {target}")
        values = self.sparsities(point)
        if point > 0:
            before = self.sparsities(point - 1)
            j = next(i for i, (a, b) in enumerate(zip(before, values)) if a != b)
            short = (self.mean(point) - target) * sum(self.sizes) / self.sizes[j]
            values[j] = min(max(values[j] - short, before[j]), values[j])
        return {name: float(v) for name, v in zip(self.names, values)}


def greedy_path(samples: list[tuple[_Evaluator, dict]], target: float, step: float = DEFAULT_STEP) -> BlockPath:
    """Run TEAL's greedy on one block until its size-weighted mean sparsity reaches ``target``.

    ``samples`` holds, per recorded call, the block's evaluator and the recorded values of
    its frontier and output.
    """
    block = samples[0][0].block
    sizes = block.sizes
    reference_size = statistics.median(sizes)
    steps = [step * reference_size / n for n in sizes]
    counts = [0] * len(sizes)
    states = []
    for evaluator, recorded in samples:
        env = {n: recorded[n] for n in evaluator.block.frontier}
        states.append(evaluator.evaluate(env, evaluator.block.nodes, [0.0] * len(sizes)))
    path = BlockPath([s.name for s in block.sites], sizes, steps, [list(counts)], [0.0])
    total = sum(sizes)
    while sum(c * s * n for c, s, n in zip(counts, steps, sizes)) / total < target - 1e-12:
        best = (math.inf, None, None)
        for j in range(len(sizes)):
            if (counts[j] + 1) * steps[j] >= 1.0 - 1e-9:
                continue
            trial = [c * s for c, s in zip(counts, steps)]
            trial[j] = (counts[j] + 1) * steps[j]
            error, norm, envs = 0.0, 0.0, []
            for (evaluator, recorded), state in zip(samples, states):
                env = evaluator.evaluate(dict(state), evaluator.block.downstream[j], trial)
                e, d = _squared_error(env[evaluator.block.output], recorded[evaluator.block.output])
                error, norm = error + e, norm + d
                envs.append(env)
            relative = error / max(norm, 1e-30)
            if relative < best[0]:
                best = (relative, j, envs)
        if best[1] is None:
            raise ValueError(f"allocation: block {block.name!r} cannot reach mean sparsity {target}: every linear is at its limit")
        counts[best[1]] += 1
        states = best[2]
        path.counts.append(list(counts))
        path.errors.append(best[0])
    return path


class AllocationRecorder:
    """A torch.compile backend that records, per call, what each block's greedy needs.

    The graph goes through the backend's prepass (``orthogonalize``) and ``find_linears``;
    the linears the backend would gate are grouped into blocks. Each call runs the graph
    dense (op by op) and keeps each block's frontier and output values.
    """

    def __init__(self, method: str, orthogonalize: str | None = None, recipe: str = "default"):
        self.method = method
        self.recipe = recipe
        self.prepass = get_method(method).recipes[recipe].prepass(orthogonalize)
        self.graphs: list[tuple[list[_Evaluator], list[dict]]] = []

    def __call__(self, gm: fx.GraphModule, example_inputs, **_):
        _, sites = prepare(gm, example_inputs, *self.prepass)
        if any(sharded.is_sharded(s.weight) for s in sites):
            raise ValueError("allocation: greedy allocation of a tensor-parallel (DTensor) model is not supported "
                             "yet; allocate on the unsharded model (same linear names) and use that calibration")
        gated = [s for s in sites if s.dense_reason is None]  # what the backend may gate
        evaluators = [_Evaluator(gm, b, self.method, self.recipe) for b in find_blocks(gm, gated)]
        keep = set().union(*(e.block.frontier for e in evaluators)) if evaluators else set()
        calls: list[dict] = []
        self.graphs.append((evaluators, calls))

        def run(*args):
            recorder = _Recorder(gm, keep)
            out = recorder.run(*args)
            calls.append(recorder.values)
            return out

        return run

    def samples(self) -> dict[tuple, list[tuple[_Evaluator, dict]]]:
        """Block key -> (evaluator, recorded values) of every call that ran that block."""
        found: dict[tuple, list] = {}
        for evaluators, calls in self.graphs:
            for evaluator in evaluators:
                found.setdefault(evaluator.block.key, []).extend((evaluator, values) for values in calls)
        return {k: v for k, v in found.items() if v}


def allocate(recorder: AllocationRecorder, targets: Iterable[float], step: float = DEFAULT_STEP,
             progress: bool = False) -> tuple[dict[float, dict[str, float]], dict[str, BlockPath]]:
    """Greedy allocations for ``targets`` from what ``recorder`` saw: ({target: {linear:
    sparsity}}, {block name: its path})."""
    targets = check_targets(targets)
    check_step(step)
    from tqdm.auto import tqdm

    if not recorder.graphs:
        raise ValueError(
            "allocation: no graph reached the allocation backend: did the model run, or did dynamo hit "
            "its recompile limit (torch._dynamo.reset() clears it)?"
        )
    blocks = recorder.samples()
    if not blocks:
        raise ValueError("allocation: the model ran but none of its linears is gated by the backend (see wina_fx.last_report())")
    allocations: dict[float, dict[str, float]] = {t: {} for t in targets}
    paths = {}
    with torch.inference_mode():
        for key, samples in tqdm(blocks.items(), desc="wina-fx greedy allocation", disable=not progress):
            path = paths[key[0]] = greedy_path(samples, max(targets), step)
            for t in targets:
                allocations[t].update(path.allocation(t))
    return allocations, paths


def check_method(method: str) -> str:
    """``method`` if the greedy models its keep rule; else ValueError naming those it does."""
    allocated = [name for name in method_names() if get_method(name).allocated]
    if method not in allocated:
        raise ValueError(
            f"greedy allocation: method must be one of {', '.join(map(repr, allocated))} "
            f"(the top-k rules it re-evaluates), got {method!r}"
        )
    return method


def leading_batches(batches: Sequence, tokens: int) -> list:
    """The first batches of ``batches`` holding at least ``tokens`` tokens (at least one)."""
    chosen, seen = [], 0
    for batch in batches:
        if seen >= tokens and chosen:
            break
        chosen.append(batch)
        seen += _num_tokens(batch)
    return chosen


def _num_tokens(batch) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0] if isinstance(batch, tuple) else batch
    return first.numel() if first.dtype in (torch.int64, torch.int32) else first.shape[:-1].numel()


def greedy_allocation(
    model: torch.nn.Module,
    inputs: Iterable,
    method: str = "wina",
    targets: Iterable[float] = DEFAULT_TARGETS,
    orthogonalize: bool | str = False,
    step: float = DEFAULT_STEP,
    progress: bool = True,
    recipe: str = "default",
) -> dict[float, dict[str, float]]:
    """{target: {linear name: sparsity}} for ``model`` on real ``inputs`` (as ``calibrate``
    takes them: tensors, tuples or mappings). Weights are not changed. The cost grows with
    the tokens in ``inputs`` and with 1 / ``step``: ~N_blocks / step * 5 block evaluations
    on those tokens (a hundred or a few hundred tokens are enough).  Under a ``recipe``, the
    linears are scored and the graph transformed as the recipe says (its dense prefix and
    shared gate/up masks are not modelled: the greedy scores every position and linear)."""
    check_method(method)
    targets = check_targets(targets)
    check_step(step)
    orthogonalize = orthogonalize_variant(orthogonalize, "greedy_allocation: orthogonalize")
    recorder = AllocationRecorder(method, orthogonalize, recipe)
    observed = torch.compile(model, backend=recorder)
    with torch.no_grad():
        for batch in inputs:
            if isinstance(batch, Mapping):
                observed(**batch)
            elif isinstance(batch, tuple):
                observed(*batch)
            else:
                observed(batch)
    return allocate(recorder, targets, step, progress)[0]
