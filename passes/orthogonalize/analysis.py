"""Orthogonalization, step 1: read the graph.  Find the residual stream, its stretches
between residual adds, the RMSNorms on it, the groups of linears reading each stretch and
the linears writing into it (a ``_Structure``); anything else raises ``_Unsupported``
with the reason, and the pass then leaves the graph alone."""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from ..find_linears import module_name_of, resolve_tensor

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

