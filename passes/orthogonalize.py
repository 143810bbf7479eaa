"""Weight orthogonalization: a prepass that makes WINA's error bound tight, losslessly.

WINA keeps the input channels i of y = W x with the largest |x_i| * ||W[:, i]||_2; that
choice minimises its error bound, and the bound is exact when W has orthogonal columns.
This pass rewrites a dynamo graph of a residual transformer so that chosen weights that
read the residual stream have orthogonal columns, while the dense function stays the same
up to floating-point rounding (row-vector convention, h~ = h Q):

1. Fold every RMSNorm scale g on the residual stream into the linears reading the norm's
   output (W <- W diag(g)); the norm keeps unit scale, and a unit-scale RMSNorm commutes
   with any orthogonal Q: rms_norm(h Q) = rms_norm(h) Q.
2. Keep each stretch of the residual stream (between two residual adds) in a rotated
   basis h~ = h Q. A linear reading rms_norm(h) becomes W Q; a linear writing into the
   stream becomes Q^T W (bias b Q); the embedding table E Q; where consecutive stretches
   use different bases, a shortcut rotation h~' = h~ (Q_prev^T Q_next) goes on the
   residual path. The output head reads the last stretch like any other reader.
3. Q is V of the SVD of the (folded) weight that reads the stretch: W = U S V^T, so
   W V = U S has orthogonal columns.

The graph's placeholders (the user's parameters) are never written to: each transformed
weight is a new constant (``add_constant``) and its use is re-pointed to it. What the
pass does not understand it leaves alone: the graph is then unchanged and the report says
why. Linear algebra runs in float64, results are cast back to each weight's dtype.

Which weight gives Q (``sources``, per role of the group of linears reading a stretch):
a projection kind ("k_proj"; the k rows of a fused qkv_proj count), "a+b+..." (V of a;
where a has a null space, fewer rows than columns, its basis comes from b's SVD restricted
to it, and so on), "stack" (all reading weights stacked: their concatenation gets
orthogonal columns) or "identity" (no rotation). microsoft/wina uses k_proj for the
attention input and gate_proj for the MLP input; DEFAULT_SOURCES holds what measured best
on SmolLM2 (benchmarks/orthogonalize_smollm2.py).

Variants (``VARIANTS``):
- "full":   every stretch of the stream gets the Q of the group reading it; 2L - 1 shortcut
            rotations of d x d for L layers (fewer where consecutive stretches are both
            unrotated).
- "local":  the stream is left alone; each group whose source is not "identity" has its
            norm's scale folded into its linears, gets an input rotation x~ = x Q right
            after the (now unit-scale) norm, and its linears become W diag(g) Q. The gated
            linears see exactly what "full" gives them (same Q, same inputs up to rounding),
            for one d x d rotation per rotated group instead of one per stretch, and no
            change to the embedding, head, writers or unrotated groups (tied weights stay
            tied). With the default sources (MLP inputs not rotated) that is L rotations
            instead of 2L - 1.
- "shared": one Q for the whole stream (eigenvectors of the summed, trace-normalised Gram
            matrices of the sources): no run-time rotation at all; no gated weight is
            exactly column-orthogonal.
"""
from __future__ import annotations

import dataclasses
import operator
import weakref

import torch
import torch.fx as fx

from .find_linears import _parameter_name, find_linears, module_name_of, resolve_tensor
from .graph_utils import add_constant

VARIANTS = ("full", "local", "shared")

DEFAULT_SOURCES = {"attention": "v_proj+k_proj+q_proj", "mlp": "identity", "other": "stack"}
REFERENCE_SOURCES = {"attention": "k_proj", "mlp": "gate_proj", "other": "stack"}  # microsoft/wina
ROLE_KINDS = {
    "attention": ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv"),
    "mlp": ("gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "w1", "w3"),
}
# Parts of fused projections, in the order of their rows.
FUSED_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

_LINEAR = (torch._C._nn.linear, torch.nn.functional.linear)
_EMBEDDING = (torch.nn.functional.embedding,)
_ADD = (operator.add, torch.add, operator.iadd)
_MUL = (operator.mul, torch.mul, operator.imul)
_CASTS = ("to", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach")


class _Unsupported(Exception):
    """The graph is not a residual transformer this pass understands; the message says why."""


@dataclasses.dataclass
class RotatedGroup:
    """The linears that read one stretch of the residual stream (through one norm)."""

    norm: str | None  # the RMSNorm whose output they read (None: they read the stream itself)
    readers: list[str]
    role: str  # "attention", "mlp", "head" or "other"
    basis: int  # index of the stretch it reads ("full", "shared": equal index, equal Q)
    source: str | None = None  # where its own Q came from, e.g. "model.layers.0.self_attn.k_proj"
    source_kind: str | None = None  # the source spec used, e.g. "k_proj" or "identity"
    # (linear, row0, row1) of the weights whose stacked rows have orthogonal columns after
    # the transform (the first part of the source spec); empty when not rotated by its own Q.
    source_rows: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OrthogonalizeReport:
    """What ``orthogonalize`` did to one graph (or, with ``applied`` False, why it did nothing)."""

    variant: str
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    applied: bool = False
    reason: str | None = None  # why the graph was left unchanged
    hidden_size: int | None = None
    norms_folded: list[str] = dataclasses.field(default_factory=list)
    groups: list[RotatedGroup] = dataclasses.field(default_factory=list)
    writers: list[str] = dataclasses.field(default_factory=list)  # linears writing into the stream (Q^T W)
    # Linears whose input basis the pass leaves as it was, and why.
    untouched: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # d x d rotations added to the run-time graph: on the residual path ("full") or on a
    # norm's output ("local"). They are dense einsums, not linears: no pass gates them.
    shortcut_rotations: int = 0
    input_rotations: int = 0
    rotation_parameters: int = 0
    rotation_flops_per_token: int = 0
    rotation_bytes_per_token: int = 0  # read once per decoded token at batch 1
    linear_weight_bytes: int = 0  # all linear weights of the graph, output head included
    untied_bytes: int = 0  # extra memory because tied weights (embedding / head) got separate copies
    tied: list[str] = dataclasses.field(default_factory=list)
    copied_bytes: int = 0  # all new constants (the user's parameters stay as they are)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def rotations(self) -> int:
        return self.shortcut_rotations + self.input_rotations

    @property
    def rotation_bytes_ratio(self) -> float:
        """Bytes of the run-time rotations per decoded token relative to the linear weights'."""
        return self.rotation_bytes_per_token / self.linear_weight_bytes if self.linear_weight_bytes else 0.0

    def group(self, reader: str) -> RotatedGroup:
        for group in self.groups:
            if reader in group.readers:
                return group
        raise KeyError(f"no group reads the residual stream with linear {reader!r}")


# --------------------------------------------------------------------------- matching


def _is(node, functions=(), methods=()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    return False


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shape(node) -> tuple | None:
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _passthrough_input(node: fx.Node) -> fx.Node | None:
    """If ``node`` applies the same map to every row of its input's last dimension in a
    way that commutes with right-multiplication by an orthogonal matrix (casts, copies,
    eval dropout, token slicing, reshapes keeping the last dimension, scaling by a
    number), return that input; else None."""
    if node.op not in ("call_function", "call_method") or not node.args:
        return None
    x = node.args[0]
    if not isinstance(x, fx.Node):
        return None
    if node.op == "call_method" and node.target in _CASTS:
        others = [a for a in node.all_input_nodes if a is not x]
        return x if node.target == "type_as" or not others else None
    if node.op == "call_function" and node.target in (torch.clone, torch.Tensor.contiguous):
        return x
    if node.op == "call_function" and node.target is torch.nn.functional.dropout:
        p, training = _arg(node, 1, "p", 0.5), _arg(node, 2, "training", True)
        return x if (p == 0 or training is False) else None
    if _is(node, _MUL + (operator.truediv, torch.div), ("mul", "div")) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(a, fx.Node) and _number(b):
            return a
        if isinstance(b, fx.Node) and _number(a) and _is(node, _MUL, ("mul",)):
            return b
        return None
    if _is(node, (operator.getitem,)) and _slices_rows_only(node.args[1], _shape(x)):
        return x
    if _is(node, (torch.reshape,), ("view", "reshape")):
        before, after = _shape(x), _shape(node)
        if before and after and before[-1] == after[-1]:
            return x
    return None


def _slices_rows_only(index, shape) -> bool:
    """True if ``tensor[index]`` keeps the whole last dimension, as the last dimension."""
    if shape is None:
        return False
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is Ellipsis or i is None or isinstance(i, (int, slice)) for i in index):
        return False  # tensor indices: give up
    if not index:
        return True
    last = index[-1]
    if last is Ellipsis:
        return True
    if last is None:
        return False
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis not in index and consumed < len(shape):
        return True
    return isinstance(last, slice) and last == slice(None, None, None)


def _is_shape_query(node: fx.Node) -> bool:
    """``x.size()``, ``x.dim()``, ``x.shape`` and the like: what dynamo emits for symbolic
    shapes; they read no values, so any rotation of x leaves them as they are."""
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "dtype", "device", "ndim")
    return node.op == "call_function" and node.target in (torch.ops.aten.sym_size.int, torch.ops.aten.sym_numel.default)


def _is_scalar(node) -> bool:
    """A graph value that is one number (eps read with ``.item()`` under dynamic shapes)."""
    if not isinstance(node, fx.Node):
        return False
    value = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def _value_users(node: fx.Node) -> set:
    return {user for user in node.users if not _is_shape_query(user)}


@dataclasses.dataclass
class _Norm:
    input: fx.Node  # the value normalised (a stream value, or a cast of one)
    nodes: set  # nodes computing it
    output: fx.Node
    scale_mul: fx.Node | None  # the mul by the scale, removed by folding
    weight_node: fx.Node | None
    functional: bool = False  # torch.nn.functional.rms_norm


def _match_rmsnorms(gm: fx.GraphModule) -> dict[fx.Node, _Norm]:
    """RMSNorms of the decomposed form x * rsqrt(mean(x^2, -1, keepdim) + eps) [* g], and
    ``F.rms_norm``, keyed by each node that reads the normalised value."""
    norms: dict[fx.Node, _Norm] = {}
    for node in gm.graph.nodes:
        if _is(node, (torch.nn.functional.rms_norm,)) and isinstance(node.args[0], fx.Node):
            weight = _arg(node, 2, "weight")
            norm = _Norm(node.args[0], {node}, node, None, weight if isinstance(weight, fx.Node) else None, True)
            norms[node] = norm
            continue
        if not _is(node, (torch.rsqrt,), ("rsqrt",)) or len(node.users) != 1:
            continue
        add = node.args[0]
        if not _is(add, _ADD, ("add",)) or len(add.users) != 1 or len(add.args) != 2:
            continue
        mean = next((a for a in add.args if _is(a, (torch.mean,), ("mean",))), None)
        if not any(_number(a) or _is_scalar(a) for a in add.args if a is not mean) or not _is(mean, (torch.mean,), ("mean",)) or len(mean.users) != 1:
            continue
        dim, keepdim = _arg(mean, 1, "dim"), _arg(mean, 2, "keepdim", False)
        pow_ = mean.args[0]
        if not _is(pow_, (torch.pow, operator.pow), ("pow",)) or pow_.args[1] != 2 or len(pow_.users) != 1:
            continue
        x = pow_.args[0]
        shape = _shape(x)
        dims = dim if isinstance(dim, (list, tuple)) else (dim,)
        if not keepdim or len(dims) != 1 or not (dims[0] == -1 or (shape and dims[0] == len(shape) - 1)):
            continue
        (mul,) = node.users
        if not _is(mul, _MUL, ("mul",)) or set(mul.args) != {x, node} or _value_users(x) != {pow_, mul}:
            continue
        nodes, out = {pow_, mean, add, node, mul}, mul
        if len(out.users) == 1 and _is(next(iter(out.users)), (), ("to", "type_as")):
            out = next(iter(out.users))
            nodes.add(out)
        scale_mul, weight = None, None
        if len(out.users) == 1:
            user = next(iter(out.users))
            other = [a for a in user.args if a is not out] if _is(user, _MUL, ("mul",)) and len(user.args) == 2 else []
            if (
                len(other) == 1
                and isinstance(other[0], fx.Node)
                and other[0].op in ("placeholder", "get_attr")
                and _shape(out) is not None
                and (_shape(other[0]) or ()) == _shape(out)[-1:]
            ):
                scale_mul, weight = user, other[0]
                nodes.add(user)
                out = user
        norm = _Norm(x, nodes, out, scale_mul, weight)
        norms[pow_] = norm
        norms[mul] = norm
    return norms


def _writer_linear(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The linear whose output reaches ``node`` through single-use pass-through ops."""
    path = []
    while True:
        if len(node.users) != 1:
            return None
        if _is(node, _LINEAR):
            return node, path
        source = _passthrough_input(node)
        if source is None:
            return None
        path.append(node)
        node = source


def _linear_parts(node: fx.Node):
    args = list(node.args) + [None] * 3
    return args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])


@dataclasses.dataclass
class _Add:
    node: fx.Node
    stream_in: fx.Node
    writer: fx.Node
    basis_in: int
    basis_out: int


@dataclasses.dataclass
class _Group:
    norm: _Norm | None
    readers: list[fx.Node]
    basis: int


@dataclasses.dataclass
class _Structure:
    embedding: fx.Node
    table: fx.Node
    hidden: int
    groups: list[_Group]
    adds: list[_Add]
    parent: dict[int, int | None]  # basis -> the basis of the stream before it


def _analyse(gm: fx.GraphModule, example_inputs) -> _Structure:
    embeddings = [n for n in gm.graph.nodes if _is(n, _EMBEDDING)]
    if not embeddings:
        raise _Unsupported(
            "no token embedding (F.embedding) in the graph: not a residual transformer whose stream starts at an embedding"
        )
    if len(embeddings) > 1:
        raise _Unsupported(f"{len(embeddings)} embedding lookups in the graph; expected one (the token embedding)")
    (embedding,) = embeddings
    table = embedding.args[1] if len(embedding.args) > 1 else embedding.kwargs.get("weight")
    if not isinstance(table, fx.Node) or table.op not in ("placeholder", "get_attr"):
        raise _Unsupported("the embedding table is computed in the graph, not a parameter")
    tensor = resolve_tensor(gm, table, example_inputs)
    if tensor is None or tensor.dim() != 2:
        raise _Unsupported("the embedding table's tensor is not available (no real example input for it)")
    if _arg(embedding, 3, "max_norm") is not None:
        raise _Unsupported("the embedding renormalises rows (max_norm), which writes to its table")
    hidden = tensor.shape[1]
    norms = _match_rmsnorms(gm)
    basis_of: dict[fx.Node, int] = {embedding: 0}
    parent: dict[int, int | None] = {0: None}
    groups: list[_Group] = []
    adds: list[_Add] = []
    seen_norms: set[int] = set()
    direct: dict[int, _Group] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    frontier = [embedding]
    while frontier:
        frontier.sort(key=order.__getitem__)
        stream = frontier.pop(0)
        basis = basis_of[stream]
        for user in sorted(stream.users, key=order.__getitem__):
            norm = norms.get(user)
            if norm is not None and norm.input is stream:
                if id(norm) not in seen_norms:
                    seen_norms.add(id(norm))
                    groups.append(_Group(norm, _readers_of(norm), basis))
                continue
            if user.op == "output":
                raise _Unsupported(
                    f"the graph returns the residual stream ({stream.name}) itself; rotating it would change the output"
                )
            if _is(user, _ADD, ("add",)) and len(user.args) == 2 and not user.kwargs:
                other = user.args[1] if user.args[0] is stream else user.args[0]
                if other is stream or other in basis_of:
                    raise _Unsupported(f"{user.name} adds two residual-stream values; only stream + sublayer output is supported")
                if user in basis_of:
                    continue
                writer = _writer_linear(other) if isinstance(other, fx.Node) else None
                if writer is None:
                    raise _Unsupported(
                        f"residual add {user.name} adds {getattr(other, 'name', other)!r}, which is not the output of a "
                        "linear (through pass-through ops only) used nowhere else"
                    )
                new = len(parent)
                parent[new] = basis
                basis_of[user] = new
                adds.append(_Add(user, stream, writer[0], basis, new))
                frontier.append(user)
                continue
            if _is(user, _LINEAR) and _linear_parts(user)[0] is stream and stream not in _linear_parts(user)[1:]:
                group = direct.get(basis)
                if group is None:
                    group = direct[basis] = _Group(None, [], basis)
                    groups.append(group)
                group.readers.append(user)
                continue
            if _is_shape_query(user):  # x.size() and the like: a rotation keeps shapes
                continue
            if _passthrough_input(user) is stream:
                if user not in basis_of:
                    basis_of[user] = basis
                    frontier.append(user)
                continue
            what = user.target if user.op == "call_method" else getattr(user.target, "__name__", user.target)
            if _is(user, (torch.nn.functional.layer_norm, torch.layer_norm), ("layer_norm",)):
                raise _Unsupported(
                    f"LayerNorm {user.name} reads the residual stream; its mean subtraction does not commute with rotations"
                )
            raise _Unsupported(
                f"the residual stream value {stream.name} is used by {user.name} ({what}), which is neither an "
                "RMSNorm, a residual add, a linear nor a row-wise pass-through op"
            )
    if not adds:
        raise _Unsupported("no residual add (stream + linear output) after the embedding: not a residual transformer")
    if not any(g.norm is not None for g in groups):
        raise _Unsupported("no RMSNorm reads the residual stream: not a residual transformer of the supported form")
    for group in groups:
        _check_readers(gm, example_inputs, group, hidden)
    for add in adds:
        _, weight, bias = _linear_parts(add.writer)
        _check_parameter(gm, example_inputs, weight, f"writer {add.writer.name}", (hidden, None))
        if bias is not None:
            _check_parameter(gm, example_inputs, bias, f"bias of writer {add.writer.name}", (hidden,))
    return _Structure(embedding, table, hidden, groups, adds, parent)


def _readers_of(norm: _Norm) -> list[fx.Node]:
    """The linears reading ``norm``'s output (through pass-through ops); raise if anything else does."""
    readers, stack = [], [norm.output]
    while stack:
        node = stack.pop()
        for user in node.users:
            if _is(user, _LINEAR) and _linear_parts(user)[0] is node and node not in _linear_parts(user)[1:]:
                readers.append(user)
            elif _passthrough_input(user) is node:
                stack.append(user)
            else:
                what = "the graph output" if user.op == "output" else f"{user.name} ({getattr(user.target, '__name__', user.target)})"
                raise _Unsupported(
                    f"the output of the RMSNorm {_norm_name(norm)} also feeds {what}, not only linears; "
                    "folding its scale and rotating its input would change that use"
                )
    if not readers:
        raise _Unsupported(f"no linear reads the output of the RMSNorm {_norm_name(norm)}")
    return readers


def _check_parameter(gm, example_inputs, node, what, shape) -> torch.Tensor:
    if not isinstance(node, fx.Node) or node.op not in ("placeholder", "get_attr"):
        raise _Unsupported(f"{what}: its tensor is computed in the graph, not a parameter")
    tensor = resolve_tensor(gm, node, example_inputs)
    if tensor is None:
        raise _Unsupported(f"{what}: its tensor is not available (no real example input for it)")
    if tensor.dim() != len(shape) or any(s is not None and s != t for s, t in zip(shape, tensor.shape)):
        raise _Unsupported(f"{what}: shape {tuple(tensor.shape)} does not fit the residual stream (expected {tuple('*' if s is None else s for s in shape)})")
    if not tensor.is_floating_point():
        raise _Unsupported(f"{what}: dtype {tensor.dtype} is not floating point")
    return tensor


def _check_readers(gm, example_inputs, group: _Group, hidden: int) -> None:
    if group.norm is not None and group.norm.weight_node is not None:
        _check_parameter(gm, example_inputs, group.norm.weight_node, f"scale of {_norm_name(group.norm)}", (hidden,))
    for reader in group.readers:
        _check_parameter(gm, example_inputs, _linear_parts(reader)[1], f"reader {reader.name}", (None, hidden))


def _norm_name(norm: _Norm) -> str:
    return module_name_of(norm.output) or norm.output.name


# --------------------------------------------------------------------------- rotations


def _linear_name(sites_by_node, node) -> str:
    site = sites_by_node.get(node)
    return site.name if site is not None else node.name


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _role(group: _Group, sites_by_node) -> str:
    sites = [sites_by_node.get(r) for r in group.readers]
    kinds = {_kind(s.name) for s in sites if s is not None}
    for role, names in ROLE_KINDS.items():
        if kinds & set(names):
            return role
    if sites and all(s is not None and s.is_output_head for s in sites):
        return "head"
    return "other"


def _fused_rows(node: fx.Node, kind: str, rows: int) -> dict[str, tuple[int, int]]:
    """Row ranges of the parts of a fused projection, read off how its output is split."""
    parts = FUSED_PARTS.get(kind)
    if parts is None:
        return {}
    users = list(node.users)
    if len(users) == 1 and _is(users[0], (torch.chunk,), ("chunk",)):
        chunks, dim = _arg(users[0], 1, "chunks"), _arg(users[0], 2, "dim", 0)
        if chunks == len(parts) and dim in (-1, len(_shape(node) or ()) - 1) and rows % chunks == 0:
            size = rows // chunks
            return {p: (i * size, (i + 1) * size) for i, p in enumerate(parts)}
        return {}
    ranges = []
    for user in users:
        if not _is(user, (operator.getitem,)):
            return {}
        index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
        if len(index) != 2 or index[0] is not Ellipsis or not isinstance(index[1], slice) or index[1].step not in (None, 1):
            return {}
        start, stop = index[1].start or 0, rows if index[1].stop is None else index[1].stop
        ranges.append((start, stop))
    ranges.sort()
    if len(ranges) != len(parts) or ranges[0][0] != 0 or ranges[-1][1] != rows:
        return {}
    if any(a[1] != b[0] for a, b in zip(ranges, ranges[1:])):
        return {}
    return dict(zip(parts, ranges))


def _source_rows(group: _Group, sites_by_node, kind: str) -> list[tuple[fx.Node, str, int, int]] | None:
    """(linear node, name, row0, row1) of the reader weight called ``kind`` in ``group``."""
    for reader in group.readers:
        site = sites_by_node.get(reader)
        if site is None or site.weight is None:
            continue
        rows = site.weight.shape[0]
        if _kind(site.name) == kind:
            return [(reader, site.name, 0, rows)]
        parts = _fused_rows(reader, _kind(site.name), rows)
        if kind in parts:
            return [(reader, site.name, *parts[kind])]
    return None


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


# --------------------------------------------------------------------------- the pass


def orthogonalize(
    gm: fx.GraphModule,
    example_inputs,
    variant: str = "full",
    *,
    sources: dict[str, str] | None = None,
) -> OrthogonalizeReport:
    """Rotate the residual stream of ``gm`` (or the inputs of its groups) in place, so that
    the source weights get orthogonal columns; the dense function is unchanged.

    ``example_inputs`` holds the real tensors of ``gm``'s placeholders (what a torch.compile
    backend receives). ``variant`` is one of ``VARIANTS``; ``sources`` overrides entries of
    ``DEFAULT_SOURCES`` (roles "attention", "mlp", "other"; see the module doc).

    Returns an :class:`OrthogonalizeReport`. If the graph is not a residual transformer of
    the supported form, ``gm`` is left unchanged and the report's ``reason`` says why.
    """
    if variant not in VARIANTS:
        raise ValueError(f"orthogonalize: variant must be one of {', '.join(map(repr, VARIANTS))}, got {variant!r}")
    spec = dict(DEFAULT_SOURCES)
    for role, value in (sources or {}).items():
        if role not in DEFAULT_SOURCES or not isinstance(value, str) or not value:
            raise ValueError(
                f"orthogonalize: sources maps {', '.join(map(repr, DEFAULT_SOURCES))} to a weight kind "
                f"(e.g. 'k_proj', 'v_proj+k_proj', 'stack', 'identity'), got {role!r}: {value!r}"
            )
        spec[role] = value
    report = OrthogonalizeReport(variant, spec)
    try:
        with torch.no_grad():
            plan = _plan(gm, example_inputs, variant, spec, report)
    except _Unsupported as err:
        report.reason = str(err)
        report.notes.append(f"orthogonalize: graph left unchanged: {err}")
        return report
    _rewrite(gm, plan)
    report.applied = True
    _write_notes(report)
    return report


@dataclasses.dataclass
class _Plan:
    structure: _Structure
    weights: dict  # node whose weight / bias / table input is replaced -> {old input node: new tensor}
    shortcuts: dict  # residual add -> (stream input node, (d, d) M: h~' = h~ M)
    input_rotations: list  # (group, (d, d) Q: x~ = x Q)
    fold: list  # norms whose scale is folded away


def _plan(gm, example_inputs, variant, spec, report) -> _Plan:
    structure = _analyse(gm, example_inputs)
    sites = find_linears(gm, example_inputs)
    by_node = {s.node: s for s in sites}
    hidden = structure.hidden
    report.hidden_size = hidden
    report.linear_weight_bytes = sum(s.weight.numel() * s.weight.element_size() for s in sites if s.weight is not None)
    def tensor(node):
        return resolve_tensor(gm, node, example_inputs)

    def folds(group):  # "local" folds only the norms of the groups it rotates
        return variant != "local" or id(group) in local_rotated

    def scale(group):
        if not folds(group) or group.norm is None or group.norm.weight_node is None:
            return None
        return tensor(group.norm.weight_node)

    def scale_key(group):
        g = scale(group)
        return g if g is not None else "no-scale"

    def folded(reader, group):  # W diag(g) in float64 (W in "local")
        weight = tensor(_linear_parts(reader)[1]).double()
        g = scale(group)
        return weight if g is None else weight * g.double()[None, :]

    # The source of Q of each group that reads a stretch first.
    roles = [_role(g, by_node) for g in structure.groups]
    chosen: dict[int, tuple[_Group, str, list]] = {}  # basis -> (group, role, [(kind, [(node, name, r0, r1)])])
    for group, role in zip(structure.groups, roles):
        if role == "head" or group.basis in chosen:
            continue
        wanted = spec[role].split("+")
        if wanted == ["identity"]:
            chosen[group.basis] = (group, role, [("identity", [])])
            continue
        found = [None if kind == "stack" else _source_rows(group, by_node, kind) for kind in wanted]
        if found[0] is None:
            if wanted[0] != "stack":
                where = _norm_name(group.norm) if group.norm else "the stream"
                report.notes.append(
                    f"orthogonalize: no {wanted[0]} reads {where}; its Q comes from all its reading weights stacked"
                )
            stack = [(r, by_node[r].name, 0, by_node[r].weight.shape[0]) for r in group.readers
                     if r in by_node and not by_node[r].is_output_head]
            chosen[group.basis] = (group, role, [("stack", stack)])
        else:
            chosen[group.basis] = (group, role, [(k, f) for k, f in zip(wanted, found) if f is not None])

    local_rotated = {id(g) for g, _, pieces in chosen.values() if variant == "local" and pieces[0][0] != "identity"}

    def source_matrix(group, entries):
        blocks = [folded(node, group)[r0:r1] for node, _, r0, r1 in entries]
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]

    def source_key(group, pieces):
        parts = ["Q", variant]
        for kind, entries in pieces:
            parts.append(kind)
            for node, _, r0, r1 in entries:
                parts += [tensor(_linear_parts(node)[1]), r0, r1]
        return parts + [scale_key(group)]

    # Q per basis, as a (cache key, compute) pair: computed only when a tensor that needs it
    # is not cached. Cache keys name the weights a Q comes from, not the Q itself.
    identity_parts = ["identity"]
    q_key: dict[int, list] = {}
    q_compute: dict[int, object] = {}

    def group_q(group, pieces):
        if pieces[0][0] == "identity":
            return identity_parts, None

        def compute():
            matrices = [source_matrix(group, entries) for _, entries in pieces]
            return _null_space_fill(matrices[0], matrices[1:])

        return source_key(group, pieces), compute

    if variant == "shared":
        rotated = {b: c for b, c in chosen.items() if c[2][0][0] != "identity"}
        shared_key = ["shared"] + [p for b, (g, r, pieces) in sorted(rotated.items()) for p in source_key(g, pieces[:1])]

        def compute_shared():
            total = torch.zeros(hidden, hidden, dtype=torch.float64)
            for _, (group, _, pieces) in sorted(rotated.items()):
                matrix = source_matrix(group, pieces[0][1])
                gram = matrix.mT @ matrix
                total += gram / gram.diagonal().sum().clamp_min(1e-300)
            _, vectors = torch.linalg.eigh(total)
            return vectors.flip(1)  # largest eigenvalue first

        for basis in structure.parent:
            q_key[basis], q_compute[basis] = (shared_key, compute_shared) if rotated else (identity_parts, None)
    elif variant == "full":
        for basis in sorted(structure.parent):  # a basis is created after its parent
            if basis in chosen:
                q_key[basis], q_compute[basis] = group_q(chosen[basis][0], chosen[basis][2])
            elif structure.parent[basis] is not None:  # e.g. the head's stretch: keep the basis before it
                up = structure.parent[basis]
                q_key[basis], q_compute[basis] = q_key[up], q_compute[up]
            else:
                q_key[basis], q_compute[basis] = identity_parts, None
    else:  # local: the stream keeps its basis
        for basis in structure.parent:
            q_key[basis], q_compute[basis] = identity_parts, None

    # Keyed by the compute function itself, not its id(): the dict keeps each alive, so a
    # freed closure's id can never be reused by another group's (that gave stale Qs).
    q_values: dict[object, torch.Tensor] = {}

    def Q(compute):
        if compute not in q_values:
            q_values[compute] = compute()
        return q_values[compute]

    def rotated_basis(basis):
        return q_compute[basis] is not None

    weights: dict[fx.Node, dict[fx.Node, torch.Tensor]] = {}

    def put(user, old, key, compute):
        weights.setdefault(user, {})[old] = _cached(key, compute)

    table = tensor(structure.table)
    if rotated_basis(0):
        c0 = q_compute[0]
        put(structure.embedding, structure.table, ["embedding", table, "|", *q_key[0]],
            lambda: (table.double() @ Q(c0)).to(table.dtype))
    input_rotations = []
    for group in structure.groups:
        if variant == "local":
            entry = chosen.get(group.basis)
            if entry is None or entry[0] is not group or entry[2][0][0] == "identity":
                continue
            key, compute = group_q(group, entry[2])
            value = group.norm.output if group.norm is not None else _linear_parts(group.readers[0])[0]
            dtype = _value_dtype(value, tensor(_linear_parts(group.readers[0])[1]).dtype)
            input_rotations.append((group, _cached(["input rotation", str(dtype), "|", *key],
                                                   lambda compute=compute, dtype=dtype: Q(compute).to(dtype))))
        else:
            key, compute = q_key[group.basis], q_compute[group.basis]
        for reader in group.readers:
            weight_node = _linear_parts(reader)[1]
            weight = tensor(weight_node)
            if compute is None:
                if scale(group) is not None:  # not rotated: the norm's scale folded, nothing else
                    put(reader, weight_node, ["reader", weight, scale_key(group)],
                        lambda reader=reader, group=group, weight=weight: folded(reader, group).to(weight.dtype))
                continue
            put(reader, weight_node, ["reader", weight, scale_key(group), "|", *key],
                lambda reader=reader, group=group, weight=weight, compute=compute:
                    (folded(reader, group) @ Q(compute)).to(weight.dtype))
        if folds(group) and group.norm is not None and group.norm.weight_node is not None:
            report.norms_folded.append(_norm_name(group.norm))
    shortcuts = {}
    for add in structure.adds:
        _, weight_node, bias_node = _linear_parts(add.writer)
        weight = tensor(weight_node)
        compute_in, compute_out = q_compute[add.basis_in], q_compute[add.basis_out]
        if compute_out is not None:
            report.writers.append(_linear_name(by_node, add.writer))
            key = q_key[add.basis_out]
            put(add.writer, weight_node, ["writer", weight, "|", *key],
                lambda weight=weight, c=compute_out: (Q(c).mT @ weight.double()).to(weight.dtype))
            if bias_node is not None:
                bias = tensor(bias_node)
                put(add.writer, bias_node, ["writer bias", bias, "|", *key],
                    lambda bias=bias, c=compute_out: (bias.double() @ Q(c)).to(bias.dtype))
        if compute_in is not compute_out:
            dtype = _value_dtype(add.stream_in, weight.dtype)
            key = ["shortcut", str(dtype), "|", *q_key[add.basis_in], "|", *q_key[add.basis_out]]

            def shortcut(a=compute_in, b=compute_out, dtype=dtype):
                left = Q(a).mT if a is not None else None
                right = Q(b) if b is not None else None
                matrix = right if left is None else (left if right is None else left @ right)
                return matrix.to(dtype)

            shortcuts[add.node] = (add.stream_in, _cached(key, shortcut))

    _describe(report, structure, chosen, roles, by_node, sites, variant, q_compute, input_rotations)
    count = len(shortcuts) + len(input_rotations)
    report.shortcut_rotations, report.input_rotations = len(shortcuts), len(input_rotations)
    rotations = [m for _, m in shortcuts.values()] + [m for _, m in input_rotations]
    report.rotation_parameters = sum(m.numel() for m in rotations)
    report.rotation_flops_per_token = 2 * report.rotation_parameters
    report.rotation_bytes_per_token = sum(m.numel() * m.element_size() for m in rotations)
    new = [t for uses in weights.values() for t in uses.values()] + rotations
    report.copied_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in new}.values())
    assert count == len(rotations)
    # Tied weights: a parameter with several uses among embedding and linears that now
    # reads as several different tensors costs its size once more per extra tensor.
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        uses = [u for u in node.users if _is(u, _LINEAR + _EMBEDDING)]
        if len(uses) < 2:
            continue
        changed = sum(1 for u in uses if node in weights.get(u, {}))
        versions = changed + (1 if changed < len(uses) else 0)
        if changed and versions > 1:
            t = tensor(node)
            report.untied_bytes += (versions - 1) * t.numel() * t.element_size()
            report.tied.append(_parameter_name(node))
    return _Plan(structure, weights, shortcuts, input_rotations,
                 [g.norm for g in structure.groups if folds(g) and g.norm is not None and g.norm.weight_node is not None])


def _value_dtype(node: fx.Node, default: torch.dtype) -> torch.dtype:
    """The dtype of the tensor ``node`` computes (from dynamo's example value), else ``default``."""
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dtype if isinstance(value, torch.Tensor) else default


def _describe(report, structure, chosen, roles, by_node, sites, variant, q_compute, input_rotations):
    local_rotated = {id(group) for group, _ in input_rotations}
    for group, role in zip(structure.groups, roles):
        names = [_linear_name(by_node, r) for r in group.readers]
        entry = RotatedGroup(_norm_name(group.norm) if group.norm else None, names, role, group.basis)
        own = group.basis in chosen and chosen[group.basis][0] is group
        if variant == "shared":
            if q_compute[group.basis] is not None:
                entry.source = "shared: eigenvectors of the summed, trace-normalised Gram matrices of the sources"
                entry.source_kind = "shared"
        elif own:
            pieces = chosen[group.basis][2]
            entry.source_kind = "+".join(kind for kind, _ in pieces)
            if pieces[0][0] == "identity":
                entry.source = "identity (not rotated)"
            elif variant == "full" or id(group) in local_rotated:
                described = []
                for kind, entries in pieces:
                    for node, name, r0, r1 in entries:
                        full = by_node[node].weight.shape[0]
                        described.append(name if (r0, r1) == (0, full) else f"{name}[{r0}:{r1}]")
                        if kind == pieces[0][0]:
                            entry.source_rows.append((name, r0, r1))
                joined = " + ".join(described)
                entry.source = f"stack({', '.join(described)})" if pieces[0][0] == "stack" else joined
        report.groups.append(entry)
    rotated_readers = {r for g in structure.groups for r in g.readers}
    writers = {a.writer for a in structure.adds}
    for site in sites:
        if site.node in rotated_readers:
            continue
        kind = _kind(site.name)
        if kind in ("o_proj", "dense", "out_proj") or "attn" in site.name or "attention" in site.name:
            why = ("its input is the attention output: it could only be rotated per head through v_proj, "
                   "which would change the values the graph returns in the KV cache")
        elif kind in ("down_proj", "fc2", "w2") or "mlp" in site.name:
            why = ("its input follows an elementwise product (act(gate) * up): only permutations and "
                   "diagonal scalings commute with it, and those leave WINA's choice unchanged")
        else:
            why = "it does not read the residual stream"
        if site.node in writers and variant != "local":
            why += "; as a writer into the stream it becomes Q^T W, which keeps W^T W (its column norms and angles)"
        report.untouched.append((site.name, why))


def _prefix(node: fx.Node) -> str:
    name = module_name_of(node) or node.name
    return "wina_orth_" + "".join(c if c.isalnum() else "_" for c in name)


def _rotate(gm: fx.GraphModule, value: fx.Node, matrix: torch.Tensor, before: fx.Node, prefix: str, role: str) -> fx.Node:
    constant = add_constant(gm, prefix, matrix, before=before)
    with gm.graph.inserting_before(before):
        # an einsum, not a linear: no pass recognises it as a linear to gate
        rotated = gm.graph.call_function(torch.einsum, ("...i,ij->...j", value, constant))
    rotated.meta["wina_orthogonalize"] = role
    if "example_value" in value.meta:
        rotated.meta["example_value"] = value.meta["example_value"]
    return rotated


def _rewrite(gm: fx.GraphModule, plan: _Plan) -> None:
    for user, replacements in plan.weights.items():
        for old, tensor in replacements.items():
            suffix = "_table" if user is plan.structure.embedding else ("_bias" if old is _linear_parts(user)[2] else "")
            new = add_constant(gm, _prefix(user) + suffix, tensor, before=user)
            new.meta["wina_orthogonalize"] = "weight"
            user.replace_input_with(old, new)
    for add, (stream, matrix) in plan.shortcuts.items():
        rotated = _rotate(gm, stream, matrix, add, "wina_orth_shortcut", "shortcut rotation")
        add.replace_input_with(stream, rotated)
    for group, matrix in plan.input_rotations:
        if group.norm is not None:
            value = group.norm.output
            users = list(value.users)
            rotated = _rotate(gm, value, matrix, value.next, "wina_orth_input", "input rotation")
            for user in users:
                user.replace_input_with(value, rotated)
        else:
            stream = _linear_parts(group.readers[0])[0]
            rotated = _rotate(gm, stream, matrix, group.readers[0], "wina_orth_input", "input rotation")
            for reader in group.readers:
                reader.replace_input_with(stream, rotated)
    for norm in plan.fold:
        if norm.functional:
            args = list(norm.output.args)
            if len(args) > 2:
                args[2] = None
                norm.output.args = tuple(args)
            else:
                norm.output.kwargs = {**norm.output.kwargs, "weight": None}
        else:
            mul = norm.scale_mul
            (kept,) = [a for a in mul.args if a is not norm.weight_node]
            mul.replace_all_uses_with(kept)
            gm.graph.erase_node(mul)
    gm.graph.lint()
    gm.recompile()


def _write_notes(report: OrthogonalizeReport) -> None:
    mib = 1 / 2**20
    own = [g for g in report.groups if g.source is not None]
    by_role: dict[str, set] = {}
    for g in own:
        by_role.setdefault(g.role, set()).add(g.source_kind)
    sources = "; ".join(f"{role}: {', '.join(sorted(kinds))}" for role, kinds in sorted(by_role.items()))
    rotated = [g for g in own if g.source_kind != "identity"]
    if report.variant == "local":
        report.notes.append(
            f"orthogonalize (local): rotated the inputs of {len(rotated)} groups of linears in place "
            f"(x Q after the norm, W Q; sources {sources}); residual stream, norms, embedding and head unchanged"
        )
    else:
        report.notes.append(
            f"orthogonalize ({report.variant}): folded {len(report.norms_folded)} RMSNorm scales; the residual stream "
            f"(width {report.hidden_size}) is rotated in {len(report.groups)} stretches ({len(rotated)} with their "
            f"own Q; sources {sources}); {len(report.writers)} writers, the embedding and the head rotated to match"
        )
    report.notes.append(
        f"orthogonalize: {report.rotations} run-time rotations ({report.shortcut_rotations} on the residual path, "
        f"{report.input_rotations} on norm outputs) add {report.rotation_parameters / 1e6:.2f}M parameters, "
        f"{report.rotation_flops_per_token / 1e6:.1f} MFLOP per token and {report.rotation_bytes_per_token * mib:.1f} MiB "
        f"read per decoded token ({100 * report.rotation_bytes_ratio:.1f}% of the linear weights' "
        f"{report.linear_weight_bytes * mib:.1f} MiB)"
    )
    if report.untied_bytes:
        report.notes.append(
            f"orthogonalize: untied {', '.join(report.tied)} (shared by the embedding and the head): each now reads "
            f"its own transformed copy, +{report.untied_bytes * mib:.1f} MiB"
        )
    report.notes.append(
        f"orthogonalize: transformed weights are new constants of the compiled graph ({report.copied_bytes * mib:.1f} MiB); "
        "the model's parameters are unchanged"
    )
    kinds: dict = {}
    for name, why in report.untouched:
        kinds[(_kind(name), why)] = kinds.get((_kind(name), why), 0) + 1
    for (kind, why), n in kinds.items():
        report.notes.append(f"orthogonalize: {n} x {kind}: input not rotated: {why}")
