"""Calibration: the distribution of channel importance at each linear, on real inputs.

``calibrate(model, inputs)`` compiles the model through the same passes as the backend,
but the gate pass is replaced by an observing one: each linear runs dense and records a
uniform sample of |x_i| * score_i over every token and channel it sees. The result,
kept as quantiles, gives a threshold for any target sparsity (TEAL's inverse CDF).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import torch
import torch.fx as fx

from wina_fx.kernels import reference
from wina_fx.passes.find_linears import LinearSite
from wina_fx.passes.prepare import prepare

from . import allocation, sharded
from .methods import get_method, method_names
from .options import WinaOptionError, orthogonalize_variant

FORMAT = "wina-fx calibration v2"
NUM_QUANTILES = 2001  # sparsity resolution 0.0005; thresholds interpolate between
ROW_SAMPLES = 128  # token rows kept per linear for method "rsparse" (its per-matrix search)


class Calibration:
    """Per-linear importance quantiles for one model and one method."""

    def __init__(
        self,
        method: str,
        names: list[str],
        quantiles: torch.Tensor,
        fingerprint: dict,
        num_tokens: int,
        orthogonalize: str | None = None,
        allocations: Mapping[float, Mapping[str, float]] | None = None,
        recipe: str = "default",
    ):
        self.method = method
        self.recipe = recipe  # the method's recipe (option 'recipe') it was observed under
        self.orthogonalize = orthogonalize  # the prepass variant the model was observed under
        # target sparsity -> {linear name: its sparsity} (greedy allocation; see allocation())
        self.allocations = {round(float(t), 6): dict(a) for t, a in (allocations or {}).items()}
        self.names = list(names)
        self.quantiles = quantiles.float().cpu()  # (num_linears, NUM_QUANTILES)
        self.fingerprint = fingerprint  # name -> (shape, checksum of the weight)
        self.num_tokens = num_tokens
        self._index = {name: i for i, name in enumerate(self.names)}
        # name -> (tokens, K) sample of whole input rows, for method "rsparse" (its search)
        self.samples: dict[str, torch.Tensor] = {}

    def threshold(self, name: str, sparsity: float) -> float:
        """The importance below which a fraction ``sparsity`` of channels falls."""
        if name not in self._index:
            raise KeyError(f"no calibration statistics for linear {name!r}")
        if sparsity <= 0.0:
            return -math.inf  # keep everything, zeros included
        row = self.quantiles[self._index[name]]
        position = sparsity * (row.numel() - 1)
        low = int(position)
        high = min(low + 1, row.numel() - 1)
        fraction = position - low
        return float(row[low] * (1 - fraction) + row[high] * fraction)

    @property
    def allocation_targets(self) -> list[float]:
        return sorted(self.allocations)

    def allocation(self, sparsity: float) -> dict[str, float] | None:
        """The per-linear sparsities of the greedy allocation for ``sparsity``, or None."""
        return self.allocations.get(round(float(sparsity), 6))

    def check_model(self, sites: list[LinearSite]) -> None:
        """Raise ValueError if this calibration was not measured on the model of ``sites``."""
        mine = {s.name: s for s in sites if s.weight is not None}
        shared = [name for name in self.names if name in mine]
        if not shared:
            raise WinaOptionError(
                "wina-fx: option 'calibration' belongs to another model: none of its "
                f"{len(self.names)} linears (e.g. {self.names[0]!r}) is in this graph"
            )
        for name in shared:
            shape, checksum = self.fingerprint[name]
            weight = mine[name].weight
            if list(weight.shape) != list(shape) or not math.isclose(
                _checksum(weight), checksum, rel_tol=1e-4, abs_tol=1e-6
            ):
                raise WinaOptionError(
                    f"wina-fx: option 'calibration' belongs to another model: linear {name!r} has "
                    f"a different weight (shape {list(weight.shape)} vs {list(shape)}, or other values)"
                )

    def save(self, path: str | os.PathLike) -> None:
        torch.save(
            {
                "format": FORMAT,
                "method": self.method,
                "names": self.names,
                "quantiles": self.quantiles,
                "fingerprint": {k: [list(v[0]), float(v[1])] for k, v in self.fingerprint.items()},
                "num_tokens": self.num_tokens,
                "orthogonalize": self.orthogonalize,
                "recipe": self.recipe,
                "allocations": {str(t): a for t, a in self.allocations.items()},
                "samples": self.samples,
            },
            path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Calibration":
        """Load a saved calibration; a missing, corrupt or foreign file raises a clear error."""
        try:
            # Inside a torch.compile backend, torch.load sees dynamo's tracing context
            # and would give meta tensors; leave that context while reading the file.
            with torch._guards.tracing(None):
                data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:
            raise ValueError(f"{os.fspath(path)!r} is not a readable wina-fx calibration file ({err})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a wina-fx calibration file (expected format {FORMAT!r})")
        quantiles = data["quantiles"]
        if quantiles.shape != (len(data["names"]), NUM_QUANTILES):
            raise ValueError(f"{os.fspath(path)!r} is a damaged wina-fx calibration file (quantile table shape)")
        fingerprint = {k: (tuple(v[0]), v[1]) for k, v in data["fingerprint"].items()}
        allocations = {float(t): a for t, a in data.get("allocations", {}).items()}
        calibration = cls(data["method"], data["names"], quantiles, fingerprint, data["num_tokens"],
                          data.get("orthogonalize"), allocations, data.get("recipe", "default"))
        calibration.samples = dict(data.get("samples", {}))
        return calibration

    def __repr__(self) -> str:
        orth = f" orthogonalize={self.orthogonalize}" if self.orthogonalize else ""
        orth += f" recipe={self.recipe}" if self.recipe != "default" else ""
        return f"<wina_fx.Calibration method={self.method}{orth} linears={len(self.names)} tokens={self.num_tokens}>"


def _checksum(weight: torch.Tensor, rows: int = 1024) -> float:
    """sum |W| in float64, by blocks of rows: a float64 copy of a whole 4096 x 14336 weight
    (and of its abs) would add 0.9 GiB to the peak memory of every compile."""
    if sharded.is_sharded(weight):  # tensor parallel: the sum over every rank's shard
        local = torch.tensor([_checksum(weight.to_local(), rows)], dtype=torch.float64, device=weight.device)
        if any(not p.is_replicate() for p in weight.placements):
            torch.distributed.all_reduce(local, group=weight.device_mesh.get_group())
        return float(local)
    flat = weight.detach().reshape(weight.shape[0], -1) if weight.dim() > 1 else weight.detach().reshape(1, -1)
    return float(sum(block.double().abs().sum() for block in flat.split(rows, dim=0)))


class _ImportanceSampler(torch.nn.Module):
    """Called on a linear's input: keeps a uniform random sample, of bounded size, of
    every importance value |x_i| * score_i seen so far. A module so that FX graphs
    can call it (``call_module``)."""

    def __init__(self, score: torch.Tensor, capacity: int, generator: torch.Generator):
        super().__init__()
        self.score = _whole(score)
        self.capacity = capacity
        self.generator = generator
        self.sample = torch.empty(0)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> None:
        values = reference.importance(_whole(x.detach()), self.score).flatten().cpu()
        new = _subsample(values, self.capacity, self.generator)
        self.sample, self.seen = _merge_uniform(
            self.sample, self.seen, new, values.numel(), self.capacity, self.generator
        )


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered whole (the same on every rank: each samples the same values), or
    the tensor itself."""
    return tensor.full_tensor() if sharded.is_sharded(tensor) else tensor


def _subsample(values: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    if len(values) <= size:
        return values
    return values[torch.randperm(len(values), generator=generator)[:size]]


def _merge_uniform(sample, seen: int, new, count: int, capacity: int, generator) -> tuple[torch.Tensor, int]:
    """(sample, seen) after merging ``sample`` (uniform over ``seen`` items) with ``new``
    (uniform over ``count`` more): draw from each in proportion to what it stands for.
    Items are rows of the first dimension."""
    total = seen + count
    from_old = round(capacity * seen / total) if total > capacity else len(sample)
    old = _subsample(sample, from_old, generator)
    new = _subsample(new, capacity - len(old), generator)
    return torch.cat([old.reshape(-1, *new.shape[1:]), new]), total


class _RowSampler(torch.nn.Module):
    """Called on a linear's input: keeps a uniform random sample of at most ``capacity`` of
    its token rows (whole input vectors), as R-Sparse's per-matrix search needs them."""

    def __init__(self, capacity: int, generator: torch.Generator):
        super().__init__()
        self.capacity = capacity
        self.generator = generator
        self.rows = torch.empty(0)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> None:
        x = _whole(x.detach())
        rows = x.reshape(-1, x.shape[-1]).float().cpu()
        self.rows, self.seen = _merge_uniform(self.rows, self.seen, rows, len(rows), self.capacity, self.generator)

    @property
    def sample(self) -> torch.Tensor:
        """The rows, in float16 when they fit (a calibration file stays small)."""
        fits = self.rows.numel() == 0 or self.rows.abs().max() < torch.finfo(torch.float16).max / 2
        return self.rows.half() if fits else self.rows


def _observing_backend(method, recipe, samplers: dict, fingerprint: dict, capacity: int, generator,
                       prepass: tuple = (None, None), rows: dict | None = None):
    """A backend that runs every linear dense and samples the importance of its input
    (after the orthogonalization prepass, when one is asked for, as the wina backend does).
    For method "cats" the importance is |act(gate(x))| of each gated MLP, recorded under its
    down projection's name; with ``rows`` (method "rsparse") whole input rows are kept too.

    Samplers are shared by name across graphs (recompilations for new shapes)."""

    def backend(gm: fx.GraphModule, example_inputs, **_):
        _, sites = prepare(gm, example_inputs, *prepass)
        observed = method.observed_inputs(sites)
        expert_ids: dict[fx.Node, fx.Node] = {}  # expert op -> its rows' experts, computed once per op
        for index, site in enumerate(sites):
            if site.problem is not None or site.is_output_head or index not in observed:
                continue
            if site.name not in samplers:
                score, _ = method.site_score(site, recipe)
                samplers[site.name] = _ImportanceSampler(score, capacity, generator)
                fingerprint[site.name] = (tuple(site.weight.shape), _checksum(site.weight))
                if rows is not None:
                    rows[site.name] = _RowSampler(ROW_SAMPLES, generator)
            gm.add_submodule(f"wina_observer_{index}", samplers[site.name])
            if rows is not None:
                gm.add_submodule(f"wina_rows_{index}", rows[site.name])
            with gm.graph.inserting_before(site.node):
                gm.graph.call_module(f"wina_observer_{index}",
                                     (_routed_rows(gm.graph, site, observed[index], expert_ids),))
                if rows is not None:
                    gm.graph.call_module(f"wina_rows_{index}", (_routed_rows(gm.graph, site, site.input, expert_ids),))
        gm.recompile()
        return gm.forward  # op by op: calibration needs the side effect, not speed

    return backend


def _routed_rows(graph: fx.Graph, site: LinearSite, x: fx.Node, expert_ids: dict) -> fx.Node:
    """x itself, or for an expert of an expert op the rows of x routed to that expert (the
    op's row-to-expert node is made once, in ``expert_ids``, and shared by its experts)."""
    if site.expert is None:
        return x
    if site.node not in expert_ids:
        rows = site.expert_rows
        expert_ids[site.node] = graph.call_function(reference.expert_of_rows, (rows.kind, rows.node, x, rows.experts))
    return graph.call_function(_rows_of, (x, expert_ids[site.node], site.expert))


def _rows_of(x: torch.Tensor, expert: torch.Tensor, wanted: int) -> torch.Tensor:
    return x[expert == wanted]


def calibrate(
    model: torch.nn.Module,
    inputs: Iterable,
    method: str = "wina",
    samples_per_linear: int = 1 << 16,
    seed: int = 0,
    progress: bool = True,
    orthogonalize: bool | str = False,
    allocation_targets: Iterable[float] | None = None,
    allocation_step: float = 0.1,
    allocation_tokens: int = 128,
    recipe: str = "default",
) -> Calibration:
    """Measure importance distributions of ``model``'s linears on real ``inputs``.

    ``inputs`` yields what the model is called with: a tensor (``model(x)``), a tuple
    (``model(*x)``) or a mapping (``model(**x)``). The model and its weights are not
    changed. Returns a :class:`Calibration` for ``method`` ("wina", "teal", "cats" or
    "rsparse"; for "rsparse" it also keeps ROW_SAMPLES input rows per linear).
    ``orthogonalize`` and ``recipe`` must be what the compile that uses this calibration
    will ask for (a prepass changes the activations the linears see, a recipe their scores).

    ``allocation_targets`` (e.g. [0.25, 0.4, 0.5, 0.65]): also find, for each target, the
    greedy per-linear allocation of ``sparsity_allocation="greedy"`` (wina_fx.allocation,
    TEAL's procedure; ``allocation_step=0.05`` is TEAL's step, at twice the cost), on the
    leading batches holding ``allocation_tokens`` tokens.
    """
    if allocation_targets is not None:
        allocation_targets = allocation.check_targets(allocation_targets)
        allocation.check_step(allocation_step)
        allocation.check_method(method)

    orthogonalize = orthogonalize_variant(orthogonalize, "calibrate: orthogonalize")
    observable = [name for name in method_names() if get_method(name).calibrated]
    if method not in observable:
        raise ValueError(f"calibrate: method must be one of {', '.join(map(repr, observable))}, got {method!r}")
    if not isinstance(samples_per_linear, int) or samples_per_linear < NUM_QUANTILES:
        raise ValueError(f"calibrate: samples_per_linear must be an int >= {NUM_QUANTILES}, got {samples_per_linear!r}")
    samplers: dict[str, _ImportanceSampler] = {}
    fingerprint: dict = {}
    generator = torch.Generator().manual_seed(seed)
    spec = _recipe(method, recipe, orthogonalize)
    rows = {} if get_method(method).keeps_input_rows else None
    backend = _observing_backend(get_method(method), spec, samplers, fingerprint, samples_per_linear, generator,
                                 spec.prepass(orthogonalize), rows)
    observed = torch.compile(model, backend=backend)
    from tqdm.auto import tqdm

    batches = inputs if isinstance(inputs, (list, tuple)) else list(inputs)
    num_tokens = 0
    with torch.no_grad():
        for batch in tqdm(batches, desc="wina-fx calibrate", disable=not progress):
            if isinstance(batch, Mapping):
                observed(**batch)
                first = next(iter(batch.values()))
            elif isinstance(batch, tuple):
                observed(*batch)
                first = batch[0]
            else:
                observed(batch)
                first = batch
            num_tokens += first.numel() if first.dtype in (torch.int64, torch.int32) else first.shape[:-1].numel()
    names = list(samplers)
    if not names:
        raise ValueError("calibrate: the model ran but no linear could be observed (see wina_fx.last_report() of a compile)")
    levels = torch.linspace(0, 1, NUM_QUANTILES, dtype=torch.float64)
    quantiles = torch.stack([_quantiles(samplers[n].sample, levels) for n in names])
    calibration = Calibration(method, names, quantiles, {n: fingerprint[n] for n in names}, num_tokens, orthogonalize,
                              recipe=recipe)
    if rows is not None:
        calibration.samples = {n: rows[n].sample for n in names}
    if allocation_targets is not None:
        calibration.allocations.update(allocation.greedy_allocation(
            model, allocation.leading_batches(batches, allocation_tokens), method, allocation_targets,
            orthogonalize, allocation_step, progress, recipe,
        ))
    return calibration


def _recipe(method: str, recipe: str, orthogonalize: str | None):
    """The method's ``Recipe`` named ``recipe``; ValueError for an unknown one, or for a
    recipe that brings its own transform beside ``orthogonalize``."""
    recipes = get_method(method).recipes
    if recipe not in recipes:
        raise ValueError(f"calibrate: recipe of method {method!r} must be one of {', '.join(map(repr, recipes))}, "
                         f"got {recipe!r}")
    if recipes[recipe].transform is not None and orthogonalize is not None:
        raise ValueError(f"calibrate: recipe {recipe!r} brings its own transform: leave orthogonalize False")
    return recipes[recipe]


def _quantiles(sample: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    ordered = sample.double().sort().values
    positions = levels * (ordered.numel() - 1)
    low = positions.floor().long()
    high = positions.ceil().long()
    fraction = positions - low
    return (ordered[low] * (1 - fraction) + ordered[high] * fraction).float()
