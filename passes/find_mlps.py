"""Find the gated MLPs of an FX graph: y = down(act(gate(x)) * up(x)).

This is an analysis: it reads the graph and changes nothing. Invariant: a ``GatedMLP`` is
returned only when all of these hold, and nothing is guessed beyond them:

- the down projection is a linear of ``sites`` whose input is one ``mul`` node,
  act(g) * u in either order;
- act is an elementwise activation of ``ACTIVATIONS`` applied to g;
- g and u are outputs of linears of ``sites`` that read the same input: two linears
  (gate_proj, up_proj), or the two halves of one fused linear (Phi3's gate_up_proj, split
  by ``chunk(2, dim=-1)`` or by slicing its last dimension in half).

Anything else (a plain act(fc1(x)) MLP, a gate computed another way) is not returned;
the caller leaves it dense and says so.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from .find_linears import LinearSite

ACTIVATIONS = (torch.nn.functional.silu, torch.nn.functional.gelu)
_ACTIVATION_MODULES = (torch.nn.SiLU, torch.nn.GELU)
_MUL = (operator.mul, torch.mul)


@dataclasses.dataclass
class GatedMLP:
    """One gated MLP; ``gate``, ``up`` and ``down`` index ``sites`` (gate == up when fused)."""

    down: int
    gate: int
    up: int
    act: fx.Node  # act(gate(x)): CATS ranks its magnitude
    product: fx.Node  # act(gate(x)) * up(x), the down projection's input

    @property
    def fused(self) -> bool:
        return self.gate == self.up


def find_gated_mlps(sites: list[LinearSite]) -> dict[int, GatedMLP]:
    """Every gated MLP whose linears are all in ``sites``, keyed by its down projection's index."""
    index_of = {site.node: i for i, site in enumerate(sites) if site.problem is None}
    found = {}
    for down, site in enumerate(sites):
        if site.problem is not None or not _is_mul(site.input):
            continue
        a, b = site.input.args[:2]
        for act, other in ((a, b), (b, a)):
            gate_source = _activation_input(act)
            if gate_source is None or not isinstance(other, fx.Node):
                continue
            gate, up = _producer(gate_source, index_of, sites), _producer(other, index_of, sites)
            if gate is None or up is None or sites[gate[0]].input is not sites[up[0]].input:
                continue
            if gate[1] != up[1] and (gate[1] is None or up[1] is None):
                continue  # a half of a fused linear with a whole one: not a gated MLP
            if gate[0] == up[0] and gate[1] == up[1]:
                continue  # both from the same output: act(g) * g is not a gated MLP
            found[down] = GatedMLP(down, gate[0], up[0], act, site.input)
            break
    return found


def _is_mul(node) -> bool:
    if not isinstance(node, fx.Node) or len(node.args) != 2 or node.kwargs:
        return False
    return (node.op == "call_function" and node.target in _MUL) or (
        node.op == "call_method" and node.target == "mul"
    )


def _activation_input(node) -> fx.Node | None:
    """g, if ``node`` is act(g) for an activation of ACTIVATIONS; else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target in ACTIVATIONS:
        return node.args[0]
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        if isinstance(module, _ACTIVATION_MODULES):
            return node.args[0]
    return None


def _producer(node: fx.Node, index_of: dict, sites) -> tuple[int, int | None] | None:
    """(site index, None) if ``node`` is a linear's output; (site index, 0 or 1) if it is
    the first or second half of a linear's output along the last dimension; else None."""
    if node in index_of:
        return index_of[node], None
    if not (node.op == "call_function" and node.target is operator.getitem):
        return None
    source, key = node.args
    if isinstance(key, int) and _is_chunk_in_two(source) and source.args[0] in index_of:
        return (index_of[source.args[0]], key) if key in (0, 1) else None
    if source in index_of and isinstance(key, tuple) and key and isinstance(key[-1], slice):
        leading_all = all(k is Ellipsis or k == slice(None) for k in key[:-1])
        half = sites[index_of[source]].out_features // 2
        if leading_all and (Ellipsis in key[:-1] or len(key) == _ndim(source)) and key[-1].step in (None, 1):
            if key[-1].start in (None, 0) and key[-1].stop == half:
                return index_of[source], 0
            if key[-1].start == half and key[-1].stop is None:
                return index_of[source], 1
    return None


def _is_chunk_in_two(node) -> bool:
    """``t.chunk(2, dim=-1)`` or ``torch.chunk(t, 2, -1)`` (dim the last one)."""
    if not isinstance(node, fx.Node):
        return False
    if not ((node.op == "call_method" and node.target == "chunk") or
            (node.op == "call_function" and node.target is torch.chunk)):
        return False
    args = list(node.args) + [None] * 3
    chunks = node.kwargs.get("chunks", args[1])
    dim = node.kwargs.get("dim", args[2] if args[2] is not None else 0)
    return chunks == 2 and (dim == -1 or dim == _ndim(node.args[0]) - 1)


def _ndim(node: fx.Node) -> int | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return value.dim() if isinstance(value, torch.Tensor) else None
