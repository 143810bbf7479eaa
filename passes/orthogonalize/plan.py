"""Orthogonalization, step 2: decide every new tensor.  For each stretch of the residual
stream the Q that rotates it (V of the SVD of its source weight), and from it the new
weights of its readers (W diag(g) Q) and writers (Q^T W), the embedding table, and the
d x d rotations the graph needs at run time (a ``_Plan``).  Nothing in the graph changes
here; tensors are cached across recompilations of one model."""
from __future__ import annotations

import dataclasses
import weakref

import torch
import torch.fx as fx

from ..find_linears import _parameter_name, find_linears, resolve_tensor
from .analysis import (_EMBEDDING, _LINEAR, _Group, _Structure, _analyse, _is, _linear_name, _linear_parts,
                       _norm_name, _role, _source_rows)
from .report import _describe

def _right_singular_vectors(weight: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(V, rank) of ``weight`` (float64): the right singular vectors as columns, by
    decreasing singular value, all K of them (a basis of the null space included).

    Taken from the eigendecomposition of W^T W: the same V as the SVD's (up to signs and
    rotations within equal singular values), V^T W^T W V is diagonal to float64 rounding,
    and it is 5 to 40 times faster than ``linalg.svd`` of a tall matrix on CPU.
    """
    gram = weight.mT @ weight
    values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0), vectors.flip(1)
    rank = int((values > values[0].clamp_min(0) * 1e-12).sum()) if values.numel() else 0
    return vectors, min(rank, *weight.shape)


def _null_space_fill(first: torch.Tensor, rest: list[torch.Tensor]) -> torch.Tensor:
    """V of ``first``'s SVD; where ``first`` has a null space (fewer rows than columns),
    its basis there comes from the SVD of each next weight restricted to what is left."""
    v, rank = _right_singular_vectors(first)
    for weight in rest:
        if rank >= v.shape[1]:
            break
        null = v[:, rank:]
        inner, inner_rank = _right_singular_vectors(weight @ null)
        v = torch.cat([v[:, :rank], null @ inner], dim=1)
        rank += inner_rank
    return v


# --------------------------------------------------------------------------- cache

# Transformed tensors are reused across recompilations of one model (new shapes, prefill
# and decode graphs) so that its weights are copied once. An entry is valid while every
# input tensor is the same live object at the same version, and its outputs are alive.
_CACHE: dict = {}


def _cache_key(parts) -> tuple:
    key = []
    for part in parts:
        if isinstance(part, torch.Tensor):
            key.append(("tensor", id(part), part.data_ptr(), part._version, tuple(part.shape), part.dtype))
        else:
            key.append(part)
    return tuple(key)


def _cached(parts, compute):
    inputs = [p for p in parts if isinstance(p, torch.Tensor)]
    key = _cache_key(parts)
    entry = _CACHE.get(key)
    if entry is not None:
        refs, out_refs = entry
        outs = [r() for r in out_refs]
        if all(r() is t for r, t in zip(refs, inputs)) and all(o is not None for o in outs):
            return outs[0] if len(outs) == 1 else outs
    value = compute()
    outs = value if isinstance(value, (list, tuple)) else [value]
    for stale in [k for k, (refs, out_refs) in _CACHE.items() if any(r() is None for r in list(refs) + list(out_refs))]:
        del _CACHE[stale]
    _CACHE[key] = ([weakref.ref(t) for t in inputs], [weakref.ref(o) for o in outs])
    return value


@dataclasses.dataclass
class _Plan:
    structure: _Structure
    weights: dict  # node whose weight / bias / table input is replaced -> {old input node: new tensor}
    shortcuts: dict  # residual add -> (stream input node, (d, d) M: h~' = h~ M)
    input_rotations: list  # (group, (d, d) Q: x~ = x Q)
    fold: list  # norms whose scale is folded away


def _plan(gm, example_inputs, variant, spec, report) -> _Plan:
    return _Planner(gm, example_inputs, variant, spec, report).plan()


class _Planner:
    """Decides every new tensor of one graph.  In order: the source weights of each stretch's
    Q (``_choose_sources``), the Q of each basis as a (cache key, compute) pair (``_bases``:
    computed only when a tensor that needs it is not cached), then the new embedding table,
    reader and writer weights and the run-time rotations, and what the report counts."""

    def __init__(self, gm, example_inputs, variant: str, spec: dict, report):
        self.gm, self.example_inputs, self.variant, self.spec, self.report = gm, example_inputs, variant, spec, report
        self.structure = _analyse(gm, example_inputs)
        self.sites = find_linears(gm, example_inputs)
        self.by_node = {s.node: s for s in self.sites}
        report.hidden_size = self.structure.hidden
        report.linear_weight_bytes = sum(s.weight.numel() * s.weight.element_size() for s in self.sites
                                         if s.weight is not None)
        self.roles = [_role(g, self.by_node) for g in self.structure.groups]
        self.chosen = self._choose_sources()  # basis -> (group, role, [(kind, [(node, name, r0, r1)])])
        self.local_rotated = {id(g) for g, _, pieces in self.chosen.values()
                              if variant == "local" and pieces[0][0] != "identity"}
        self.q_key, self.q_compute = self._bases()
        # Keyed by the compute function itself, not its id(): the dict keeps each alive, so a
        # freed closure's id can never be reused by another group's (that gave stale Qs).
        self.q_values: dict[object, torch.Tensor] = {}
        self.weights: dict[fx.Node, dict[fx.Node, torch.Tensor]] = {}

    def plan(self) -> _Plan:
        self._embedding()
        input_rotations = self._readers()
        shortcuts = self._writers()
        _describe(self.report, self.structure, self.chosen, self.roles, self.by_node, self.sites, self.variant,
                  self.q_compute, input_rotations)
        self._account(shortcuts, input_rotations)
        fold = [g.norm for g in self.structure.groups
                if self.folds(g) and g.norm is not None and g.norm.weight_node is not None]
        return _Plan(self.structure, self.weights, shortcuts, input_rotations, fold)

    # -- tensors of the graph, norm scales folded

    def tensor(self, node):
        return resolve_tensor(self.gm, node, self.example_inputs)

    def folds(self, group) -> bool:
        """"local" folds only the norms of the groups it rotates."""
        return self.variant != "local" or id(group) in self.local_rotated

    def scale(self, group):
        if not self.folds(group) or group.norm is None or group.norm.weight_node is None:
            return None
        return self.tensor(group.norm.weight_node)

    def scale_key(self, group):
        g = self.scale(group)
        return g if g is not None else "no-scale"

    def folded(self, reader, group):
        """W diag(g) in float64 (W in "local")."""
        weight = self.tensor(_linear_parts(reader)[1]).double()
        g = self.scale(group)
        return weight if g is None else weight * g.double()[None, :]

    # -- where each Q comes from

    def _choose_sources(self) -> dict:
        """The source of Q of each group that reads a stretch first."""
        chosen: dict[int, tuple[_Group, str, list]] = {}
        for group, role in zip(self.structure.groups, self.roles):
            if role == "head" or group.basis in chosen:
                continue
            wanted = self.spec[role].split("+")
            if wanted == ["identity"]:
                chosen[group.basis] = (group, role, [("identity", [])])
                continue
            found = [None if kind == "stack" else _source_rows(group, self.by_node, kind) for kind in wanted]
            if found[0] is None:
                if wanted[0] != "stack":
                    where = _norm_name(group.norm) if group.norm else "the stream"
                    self.report.notes.append(
                        f"orthogonalize: no {wanted[0]} reads {where}; its Q comes from all its reading weights stacked")
                stack = [(r, self.by_node[r].name, 0, self.by_node[r].weight.shape[0]) for r in group.readers
                         if r in self.by_node and not self.by_node[r].is_output_head]
                chosen[group.basis] = (group, role, [("stack", stack)])
            else:
                chosen[group.basis] = (group, role, [(k, f) for k, f in zip(wanted, found) if f is not None])
        return chosen

    def source_matrix(self, group, entries):
        blocks = [self.folded(node, group)[r0:r1] for node, _, r0, r1 in entries]
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    def source_key(self, group, pieces) -> list:
        """Cache keys name the weights a Q comes from, not the Q itself."""
        parts = ["Q", self.variant]
        for kind, entries in pieces:
            parts.append(kind)
            for node, _, r0, r1 in entries:
                parts += [self.tensor(_linear_parts(node)[1]), r0, r1]
        return parts + [self.scale_key(group)]

    def group_q(self, group, pieces):
        if pieces[0][0] == "identity":
            return _IDENTITY, None

        def compute():
            matrices = [self.source_matrix(group, entries) for _, entries in pieces]
            return _null_space_fill(matrices[0], matrices[1:])

        return self.source_key(group, pieces), compute

    def _bases(self) -> tuple[dict, dict]:
        """(cache key, compute or None) of the Q of every basis of the stream."""
        q_key: dict[int, list] = {}
        q_compute: dict[int, object] = {}
        parent = self.structure.parent
        if self.variant == "shared":
            rotated = {b: c for b, c in self.chosen.items() if c[2][0][0] != "identity"}
            key = ["shared"] + [p for b, (g, r, pieces) in sorted(rotated.items()) for p in self.source_key(g, pieces[:1])]

            def compute_shared():
                total = torch.zeros(self.structure.hidden, self.structure.hidden, dtype=torch.float64)
                for _, (group, _, pieces) in sorted(rotated.items()):
                    matrix = self.source_matrix(group, pieces[0][1])
                    gram = matrix.mT @ matrix
                    total += gram / gram.diagonal().sum().clamp_min(1e-300)
                _, vectors = torch.linalg.eigh(total)
                return vectors.flip(1)  # largest eigenvalue first

            for basis in parent:
                q_key[basis], q_compute[basis] = (key, compute_shared) if rotated else (_IDENTITY, None)
        elif self.variant == "full":
            for basis in sorted(parent):  # a basis is created after its parent
                if basis in self.chosen:
                    q_key[basis], q_compute[basis] = self.group_q(self.chosen[basis][0], self.chosen[basis][2])
                elif parent[basis] is not None:  # e.g. the head's stretch: keep the basis before it
                    q_key[basis], q_compute[basis] = q_key[parent[basis]], q_compute[parent[basis]]
                else:
                    q_key[basis], q_compute[basis] = _IDENTITY, None
        else:  # local: the stream keeps its basis
            for basis in parent:
                q_key[basis], q_compute[basis] = _IDENTITY, None
        return q_key, q_compute

    def Q(self, compute):
        if compute not in self.q_values:
            self.q_values[compute] = compute()
        return self.q_values[compute]

    # -- the new tensors

    def put(self, user, old, key, compute) -> None:
        self.weights.setdefault(user, {})[old] = _cached(key, compute)

    def _embedding(self) -> None:
        table = self.tensor(self.structure.table)
        c0 = self.q_compute[0]
        if c0 is not None:
            self.put(self.structure.embedding, self.structure.table, ["embedding", table, "|", *self.q_key[0]],
                     lambda: (table.double() @ self.Q(c0)).to(table.dtype))

    def _readers(self) -> list:
        """New reader weights (W diag(g) Q); returns the input rotations of "local"."""
        input_rotations = []
        for group in self.structure.groups:
            if self.variant == "local":
                entry = self.chosen.get(group.basis)
                if entry is None or entry[0] is not group or entry[2][0][0] == "identity":
                    continue
                key, compute = self.group_q(group, entry[2])
                value = group.norm.output if group.norm is not None else _linear_parts(group.readers[0])[0]
                dtype = _value_dtype(value, self.tensor(_linear_parts(group.readers[0])[1]).dtype)
                input_rotations.append((group, _cached(["input rotation", str(dtype), "|", *key],
                                                       lambda compute=compute, dtype=dtype: self.Q(compute).to(dtype))))
            else:
                key, compute = self.q_key[group.basis], self.q_compute[group.basis]
            for reader in group.readers:
                weight_node = _linear_parts(reader)[1]
                weight = self.tensor(weight_node)
                if compute is None:
                    if self.scale(group) is not None:  # not rotated: the norm's scale folded, nothing else
                        self.put(reader, weight_node, ["reader", weight, self.scale_key(group)],
                                 lambda reader=reader, group=group, weight=weight:
                                     self.folded(reader, group).to(weight.dtype))
                    continue
                self.put(reader, weight_node, ["reader", weight, self.scale_key(group), "|", *key],
                         lambda reader=reader, group=group, weight=weight, compute=compute:
                             (self.folded(reader, group) @ self.Q(compute)).to(weight.dtype))
            if self.folds(group) and group.norm is not None and group.norm.weight_node is not None:
                self.report.norms_folded.append(_norm_name(group.norm))
        return input_rotations

    def _writers(self) -> dict:
        """New writer weights (Q^T W, bias b Q); returns the shortcut rotations of the adds
        whose two stretches have different bases."""
        shortcuts = {}
        for add in self.structure.adds:
            _, weight_node, bias_node = _linear_parts(add.writer)
            weight = self.tensor(weight_node)
            compute_in, compute_out = self.q_compute[add.basis_in], self.q_compute[add.basis_out]
            if compute_out is not None:
                self.report.writers.append(_linear_name(self.by_node, add.writer))
                key = self.q_key[add.basis_out]
                self.put(add.writer, weight_node, ["writer", weight, "|", *key],
                         lambda weight=weight, c=compute_out: (self.Q(c).mT @ weight.double()).to(weight.dtype))
                if bias_node is not None:
                    bias = self.tensor(bias_node)
                    self.put(add.writer, bias_node, ["writer bias", bias, "|", *key],
                             lambda bias=bias, c=compute_out: (bias.double() @ self.Q(c)).to(bias.dtype))
            if compute_in is not compute_out:
                dtype = _value_dtype(add.stream_in, weight.dtype)
                key = ["shortcut", str(dtype), "|", *self.q_key[add.basis_in], "|", *self.q_key[add.basis_out]]

                def shortcut(a=compute_in, b=compute_out, dtype=dtype):
                    left = self.Q(a).mT if a is not None else None
                    right = self.Q(b) if b is not None else None
                    matrix = right if left is None else (left if right is None else left @ right)
                    return matrix.to(dtype)

                shortcuts[add.node] = (add.stream_in, _cached(key, shortcut))
        return shortcuts

    def _account(self, shortcuts: dict, input_rotations: list) -> None:
        """The report's counts: run-time rotations, copied bytes, tied weights now untied."""
        report = self.report
        report.shortcut_rotations, report.input_rotations = len(shortcuts), len(input_rotations)
        rotations = [m for _, m in shortcuts.values()] + [m for _, m in input_rotations]
        report.rotation_parameters = sum(m.numel() for m in rotations)
        report.rotation_flops_per_token = 2 * report.rotation_parameters
        report.rotation_bytes_per_token = sum(m.numel() * m.element_size() for m in rotations)
        new = [t for uses in self.weights.values() for t in uses.values()] + rotations
        report.copied_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in new}.values())
        # Tied weights: a parameter with several uses among embedding and linears that now
        # reads as several different tensors costs its size once more per extra tensor.
        for node in self.gm.graph.nodes:
            if node.op != "placeholder":
                continue
            uses = [u for u in node.users if _is(u, _LINEAR + _EMBEDDING)]
            if len(uses) < 2:
                continue
            changed = sum(1 for u in uses if node in self.weights.get(u, {}))
            versions = changed + (1 if changed < len(uses) else 0)
            if changed and versions > 1:
                t = self.tensor(node)
                report.untied_bytes += (versions - 1) * t.numel() * t.element_size()
                report.tied.append(_parameter_name(node))


_IDENTITY = ["identity"]  # the cache key of "no rotation"


def _value_dtype(node: fx.Node, default: torch.dtype) -> torch.dtype:
    """The dtype of the tensor ``node`` computes (from dynamo's example value), else ``default``."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dtype if isinstance(value, torch.Tensor) else default

