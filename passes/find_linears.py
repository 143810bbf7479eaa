"""Find the linear layers of an FX graph and tie each to its module and weight.

This is an analysis: it reads the graph and changes nothing. It recognises
``F.linear(x, W, b)``, ``x @ W.t()`` / ``x @ W.T`` / ``x @ W`` (Falcon's linears) and
``torch.addmm(b, x, W)`` (GPT-2's Conv1D, W stored (in, out)) where W is a parameter, reached
either as a placeholder (dynamo lifts parameters to graph inputs; ``example_inputs``
holds their real tensors) or as a ``get_attr`` (``torch.fx.symbolic_trace``).

Mixture-of-experts weights stored as one 3-D parameter (E, N, K) (or (E, K, N)) are read
by one op for all experts: a grouped matmul over rows sorted by expert (``grouped_mm``,
row groups given by ``offs``) or a batched one over per-row gathered weights
(``bmm(W[ids], x[..., None])``).  Each expert e of such an op is a site of its own, named
``<parameter>.<e>``, whose weight is the (N, K) slice W[e] and whose input rows are the
rows routed to e (``expert_rows`` says how the op tells them apart).
"""
from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.fx as fx

_LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
_MATMUL_TARGETS = (torch.matmul, operator.matmul)
_ADDMM_TARGETS = (torch.addmm,)
_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, "softmax")
_SIGMOID = (torch.sigmoid, torch.nn.functional.sigmoid, "sigmoid")
# ops that only reshape, transpose or cast a tensor: followed to the op that really reads it
_SHAPE_OR_CAST = ("float", "to", "type", "view", "reshape", "contiguous", "transpose", "t", "permute", torch.reshape)
_EMBEDDING_TARGETS = (torch.nn.functional.embedding, torch.embedding)


@dataclasses.dataclass(frozen=True)
class ExpertRows:
    """How the rows of an expert op's input map to experts: ``kind`` "offsets" (rows sorted
    by expert; ``node`` holds the cumulative row counts, as grouped_mm's ``offs``) or "ids"
    (``node`` holds each row's expert id); ``experts``: E."""

    kind: str
    node: fx.Node
    experts: int


@dataclasses.dataclass
class LinearSite:
    """One linear y = x W^T + b found in a graph.

    ``weight`` is the real (N, K) tensor (a transposed view for ``x @ W`` with W of
    shape (K, N)); ``problem`` says why the linear cannot be rewritten, or is None.
    """

    node: fx.Node
    name: str
    input: fx.Node
    weight_node: fx.Node | None
    bias_node: fx.Node | None
    own_weight: torch.Tensor | None  # None for an expert: ``weight`` views its 3-D weight
    weight_is_transposed: bool = False
    is_output_head: bool = False
    is_router: bool = False  # its output selects experts (top-k) or gates a shared expert (sigmoid, 1 output)
    problem: str | None = None
    expert: int | None = None  # the expert of a 3-D expert weight this site is (weight = W[expert])
    expert_rows: ExpertRows | None = None  # how the op's input rows map to experts
    stacked: torch.Tensor | None = None  # that 3-D weight, as stored

    @property
    def weight(self) -> torch.Tensor | None:
        """W (N, K).  An expert's is a view of its 3-D weight taken at each read, so that no
        site holds the storage the backend re-lays out (the old one would live on beside
        the new: on an H200, a compiled Mixtral-shaped model peaked at 1.95x dense)."""
        if self.stacked is not None:
            return _expert_weight(self.stacked, self.expert, self.weight_is_transposed)
        return self.own_weight

    @property
    def in_features(self) -> int | None:
        return None if self.weight is None else self.weight.shape[1]

    @property
    def out_features(self) -> int | None:
        return None if self.weight is None else self.weight.shape[0]

    @property
    def reader(self) -> fx.Node:
        """The node whose reading of ``input`` the site's sparsity changes: the linear itself,
        or for an expert, the expert op or the node reading x on its behalf (bmm reads
        x[..., None])."""
        if self.expert is None or self.input in self.node.all_input_nodes:
            return self.node
        return next(a for a in self.node.all_input_nodes if self.input in a.all_input_nodes)

    @property
    def dense_reason(self) -> str | None:
        """Why no method may sparsify this linear (no usable weight, the output head, a
        router), or None when it can be gated."""
        if self.problem is not None:
            return self.problem
        if self.is_output_head:
            return "output head (logits projection)"
        if self.is_router:
            return "router (its output selects or gates experts; few bytes, and routing must not change)"
        return None


def module_name_of(node: fx.Node) -> str | None:
    """The dotted name of the innermost module that emitted ``node``, as the user's
    ``model.named_modules()`` spells it (dynamo records it in ``nn_module_stack``)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, _cls = list(stack.values())[-1]
    return _normalise_module_path(path)


def _normalise_module_path(path: str) -> str:
    # dynamo writes e.g. "L['self'].model.layers[0].mlp" or
    # "L['self']._modules['model']"; named_modules() writes "model.layers.0.mlp".
    # The root is "L['args'][0]" when forward is wrapped by a decorator taking *args
    # (transformers >= 5.24 does this).
    path = re.sub(r"^L\['[^']*'\](?:\[\d+\])?\.?", "", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(?:'([^']*)'|(\d+))\]", lambda m: "." + (m.group(1) or m.group(2)), path)
    path = re.sub(r"getattr\(([^,]*), '([^']*)'\)", r"\1.\2", path)
    return re.sub(r"\.+", ".", path).strip(".")


def _parameter_name(node: fx.Node) -> str:
    # "l_self_modules_model_modules_layers_modules_0_..._parameters_weight_" -> readable.
    # As in _normalise_module_path, the root local ("self", "fn", "args_0", ...) is
    # whatever precedes the first "_modules_" or "_parameters_".
    name = node.target if node.op == "get_attr" else node.name
    name = re.sub(r"^l_\w*?(?=_(?:modules|parameters)_)", "", str(name))
    return name.replace("_modules_", ".").replace("_parameters_", ".").strip("_.")


def resolve_tensor(gm: fx.GraphModule, node: fx.Node, example_inputs) -> torch.Tensor | None:
    """The real tensor behind a placeholder or get_attr node, or None (fake or unknown)."""
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm)
    elif node.op == "placeholder" and example_inputs is not None:
        index = [n for n in gm.graph.nodes if n.op == "placeholder"].index(node)
        value = example_inputs[index] if index < len(example_inputs) else None
    else:
        return None
    if not isinstance(value, torch.Tensor) or isinstance(value, torch._subclasses.FakeTensor):
        return None
    return value


def _is_transpose_of_2d(node: fx.Node) -> fx.Node | None:
    """If ``node`` is W.t() / W.T / W.transpose(0, 1) / W.permute(1, 0), return W's node."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "t":
        return node.args[0]
    if node.op == "call_function" and node.target is torch.t:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1:] in (("T",), ("mT",)):
        return node.args[0]
    if node.op in ("call_method", "call_function") and node.target in ("transpose", torch.transpose):
        if sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
            return node.args[0]
    if node.op in ("call_method", "call_function") and node.target in ("permute", torch.permute):
        dims = node.args[1] if len(node.args) == 2 else node.args[1:]
        if list(dims) == [1, 0]:
            return node.args[0]
    return None


def _match_linear(node: fx.Node):
    """(input, weight node, bias node, weight is stored (K, N)) or None.

    For an ``nn.Linear`` kept as a ``call_module`` (``fx.symbolic_trace``), the weight
    and bias nodes are None: the gate pass reads them with ``get_attr``.
    """
    if node.op == "call_module" and isinstance(_submodule(node), torch.nn.Linear):
        return node.args[0], None, None, False
    if node.op != "call_function":
        return None
    if node.target in _LINEAR_TARGETS:
        args = list(node.args) + [None] * 3
        x, w, b = args[0], node.kwargs.get("weight", args[1]), node.kwargs.get("bias", args[2])
        return x, w, b, False
    if node.target in _MATMUL_TARGETS and len(node.args) == 2 and not node.kwargs:
        return _against_parameter(*node.args, bias=None)
    if node.target in _ADDMM_TARGETS and len(node.args) == 3 and not node.kwargs:  # no beta / alpha
        bias, x, rhs = node.args
        return _against_parameter(x, rhs, bias)
    return None


def _against_parameter(x, rhs, bias):
    """x @ rhs where rhs is a parameter W (stored (K, N)) or its transpose (W stored (N, K))."""
    parameter = _is_transpose_of_2d(rhs)
    if parameter is not None and parameter.op in ("placeholder", "get_attr"):
        return x, parameter, bias, False
    if isinstance(rhs, fx.Node) and rhs.op in ("placeholder", "get_attr"):
        return x, rhs, bias, True
    return None


def _grouped_mm_targets() -> tuple:
    """The grouped matmul ops of torch, and transformers' fallback when it is registered
    (looked up per graph: transformers registers it when its MoE code is first imported)."""
    targets = [getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None)]
    transformers_ops = getattr(torch.ops, "transformers", None)
    if transformers_ops is not None and hasattr(transformers_ops, "grouped_mm_fallback"):
        packet = transformers_ops.grouped_mm_fallback
        targets += [packet, packet.default]
    return tuple(t for t in targets if t is not None)


def _is_3d_transpose(node) -> fx.Node | None:
    """If ``node`` swaps the last two dims of a 3-D tensor (transpose(-2, -1), transpose(1, 2),
    mT), return that tensor's node."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("mT",):
        return node.args[0]
    if node.op in ("call_method", "call_function") and node.target in ("transpose", torch.transpose):
        if sorted(int(d) % 3 for d in node.args[1:3]) == [1, 2]:
            return node.args[0]
    return None


def _is_parameter_node(node) -> bool:
    return isinstance(node, fx.Node) and node.op in ("placeholder", "get_attr")


def _match_experts(node: fx.Node, grouped_mm: tuple):
    """(input, 3-D parameter node, parameter stored (E, K, N), ExpertRows without E) or None;
    ``grouped_mm``: the grouped matmul targets."""
    if node.op != "call_function":
        return None
    if node.target in grouped_mm:
        x, rhs = node.args[:2]
        offs = node.kwargs.get("offs", node.args[2] if len(node.args) > 2 else None)
        if not isinstance(offs, fx.Node):
            return None
        stored = _is_3d_transpose(rhs)
        if _is_parameter_node(stored):  # x @ W[e].T, W stored (E, N, K)
            return x, stored, False, ("offsets", offs)
        if _is_parameter_node(rhs):  # x @ W[e], W stored (E, K, N)
            return x, rhs, True, ("offsets", offs)
        return None
    if node.target in (torch.bmm, "bmm") and len(node.args) == 2:
        lhs, rhs = node.args
        for gathered, vector, transposed in ((lhs, rhs, False), (rhs, lhs, True)):
            # bmm(W[ids], x[..., None]) with W (E, N, K), or bmm(x[:, None], W[ids]) with W (E, K, N)
            if (isinstance(gathered, fx.Node) and gathered.target is operator.getitem
                    and _is_parameter_node(gathered.args[0]) and isinstance(gathered.args[1], fx.Node)
                    and isinstance(vector, fx.Node) and vector.target in ("unsqueeze", torch.unsqueeze)):
                return vector.args[0], gathered.args[0], transposed, ("ids", gathered.args[1])
    return None


def _decides_routing(node: fx.Node, out_features: int | None, hops: int = 4) -> bool:
    """A mixture-of-experts router: the linear's output reaches a top-k (through softmax,
    casts, views), or, with one output, a sigmoid (the gate of a shared expert)."""
    frontier = [(node, 0)]
    while frontier:
        current, depth = frontier.pop()
        for user in current.users:
            target = user.target
            if target is torch.topk or (user.op == "call_method" and target == "topk"):
                return True
            if target in _SIGMOID and out_features == 1:
                return True
            if depth < hops and (target in _SOFTMAX or target in _SHAPE_OR_CAST):
                frontier.append((user, depth + 1))
    return False


def _submodule(node: fx.Node) -> torch.nn.Module | None:
    try:
        return node.graph.owning_module.get_submodule(node.target)
    except AttributeError:
        return None


def _vocabulary_sizes(gm: fx.GraphModule, example_inputs) -> set[int]:
    sizes = set()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _EMBEDDING_TARGETS:
            table = node.args[1] if node.target is torch.nn.functional.embedding else node.args[0]
            if isinstance(table, fx.Node):
                tensor = resolve_tensor(gm, table, example_inputs)
                if tensor is not None:
                    sizes.add(tensor.shape[0])
    return sizes


def _linears_feeding_output(gm: fx.GraphModule, linear_nodes: set[fx.Node]) -> set[fx.Node]:
    """Linears from which a path reaches the graph output without another linear."""
    found, stack, visited = set(), [n for n in gm.graph.nodes if n.op == "output"], set()
    while stack:
        node = stack.pop()
        if node in visited:
            continue
        visited.add(node)
        if node in linear_nodes:
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def find_linears(gm: fx.GraphModule, example_inputs=None) -> list[LinearSite]:
    """Every linear of ``gm`` in graph order, each tied to its module name and weight.

    A linear is an output head (the logits projection) when its out_features equal the
    row count of an embedding table the graph reads and its result reaches the graph's
    output through no other linear, and no later linear's does (a fused q/k/v whose width
    happens to equal the vocabulary reaches the output too, through the k/v cache). A linear whose weight is
    computed in the graph, or whose tensor is not at hand, gets a ``problem``.
    """
    vocabulary_sizes = _vocabulary_sizes(gm, example_inputs)
    linear_nodes = {node for node in gm.graph.nodes if _match_linear(node) is not None}
    last_linears = _linears_feeding_output(gm, linear_nodes)
    position = {node: i for i, node in enumerate(gm.graph.nodes)}
    grouped_mm = _grouped_mm_targets()
    sites = []
    for node in gm.graph.nodes:
        sites += _expert_sites(gm, node, example_inputs, grouped_mm)
        matched = _match_linear(node)
        if matched is None:
            continue
        x, weight_node, bias_node, transposed = matched
        problem, weight = None, None
        if node.op == "call_module":
            weight = _submodule(node).weight
        elif not isinstance(weight_node, fx.Node) or weight_node.op not in ("placeholder", "get_attr"):
            problem = "weight is computed in the graph, not a parameter"
        else:
            weight = resolve_tensor(gm, weight_node, example_inputs)
            if weight is None:
                problem = "weight tensor is not available (no real example input for it)"
            elif weight.dim() != 2:
                problem = f"weight has {weight.dim()} dims, expected 2"
                weight = None
            elif transposed:
                weight = weight.t()
        if node.op == "call_module":
            name = node.target
        elif module_name_of(node):
            name = module_name_of(node)
        elif problem is None:
            name = _parameter_name(weight_node)
        else:
            name = node.name
        if name.endswith(".weight"):
            name = name[: -len(".weight")]
        site = LinearSite(node, name, x, weight_node, bias_node, weight, transposed, problem=problem)
        site.is_output_head = (
            node in last_linears and weight is not None and weight.shape[0] in vocabulary_sizes
            and not any(position[later] > position[node] for later in last_linears)
        )
        site.is_router = _decides_routing(node, site.out_features)
        sites.append(site)
    _make_names_unique(sites)
    return sites


def _expert_sites(gm: fx.GraphModule, node: fx.Node, example_inputs, grouped_mm: tuple) -> list[LinearSite]:
    """The sites of an op reading a 3-D expert weight, one per expert (none if it is not one,
    or if the weight's tensor is not at hand)."""
    matched = _match_experts(node, grouped_mm)
    if matched is None:
        return []
    x, weight_node, transposed, (kind, rows_node) = matched
    weight = resolve_tensor(gm, weight_node, example_inputs)
    if weight is None or weight.dim() != 3:
        return []
    name = _parameter_name(weight_node)
    rows = ExpertRows(kind, rows_node, weight.shape[0])
    return [LinearSite(node, f"{name}.{e}", x, weight_node, None, None, transposed, expert=e, expert_rows=rows,
                       stacked=weight) for e in range(weight.shape[0])]


def _expert_weight(stacked: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
    """W_e (N, K) of a 3-D expert weight (stored (E, N, K), or (E, K, N) when transposed): a view."""
    return stacked[expert].t() if transposed else stacked[expert]


def unrecognized_weights(gm: fx.GraphModule, sites: list[LinearSite], example_inputs=None):
    """Parameters of two or more dims that the graph reads other than as a found linear's
    weight or an embedding table (mixture-of-experts weights read by a grouped matmul, a
    convolution's kernel, ...): (name, shape, what reads them).  The backend reports each
    as dense, so that no weight is left out of the report silently."""
    known = {s.weight_node for s in sites if s.weight_node is not None}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _EMBEDDING_TARGETS:
            known.add(node.args[1] if node.target is torch.nn.functional.embedding else node.args[0])
    found = []
    for node in gm.graph.nodes:
        if node.op not in ("placeholder", "get_attr") or node in known or not node.users:
            continue
        value = resolve_tensor(gm, node, example_inputs)
        if not isinstance(value, torch.nn.Parameter) or value.dim() < 2:
            continue
        reader = next(iter(node.users))
        while reader.target in _SHAPE_OR_CAST and reader.users:
            reader = next(iter(reader.users))
        name = str(getattr(reader.target, "__name__", reader.target))
        found.append((_parameter_name(node).removesuffix(".weight"), tuple(value.shape), name))
    return found


def _make_names_unique(sites: list[LinearSite]) -> None:
    # A module that calls its weight twice gives two sites of one name: number them.
    seen: dict[str, int] = {}
    for site in sites:
        seen[site.name] = seen.get(site.name, 0) + 1
        if seen[site.name] > 1:
            site.name = f"{site.name}#{seen[site.name]}"
