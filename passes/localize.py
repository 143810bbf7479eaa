"""Trace a tensor-parallel graph down to its local shards.

A model sharded with ``parallelize_module`` reaches the backend as a graph whose weights
are DTensors.  Compiled as it is, every call pays AOTAutograd's unwrapping of each DTensor
input into its local tensor, in Python (on two H200s, half the host time of a decode step,
which the host, not the GPU, then paced: benchmarks/NOTES.md, session 9).  This pass
traces the graph once more, under dynamo's fake tensors, with every DTensor (input or
constant of the graph) rebuilt from its local shard, so that DTensor's own dispatch (the
sharding strategies of ``sharded.py`` included) writes the graph each rank runs: local
tensors, and the collectives as functional ops.  The compiled step then takes each
DTensor argument's local tensor, an attribute read.

Invariant: the local graph computes on every rank exactly the local shards the DTensor
graph computes (the same ops and collectives, in the same order), with symbolic sizes
kept symbolic; the graph's constants are read, never copied.  A graph returning a DTensor
(its caller expects one), or training a DTensor weight (its gradient belongs to the
DTensor), is left as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq
from torch.utils import _pytree as pytree

from wina_fx import sharded


def sharded_inputs(example_inputs) -> list[int]:
    """Positions of the DTensor inputs."""
    return [i for i, value in enumerate(example_inputs) if sharded.is_sharded(value)]


def localize(gm: fx.GraphModule, example_inputs) -> fx.GraphModule | None:
    """The graph over local shards (same placeholders, each DTensor one now its local
    tensor), or None when ``gm`` has no DTensor input, trains one, or returns a DTensor."""
    positions = sharded_inputs(example_inputs)
    if not positions or (torch.is_grad_enabled() and any(example_inputs[i].requires_grad for i in positions)):
        return None  # a training graph: gradients must reach the DTensor parameters themselves
    from torch._subclasses.fake_tensor import FakeTensor

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    traced = [n.meta.get("example_value", n.meta.get("val")) for n in placeholders]
    # the fake mode dynamo traced the placeholders with (not always the tracing context's)
    fake_mode = next((sharded.local(t).fake_mode for t in traced if isinstance(sharded.local(t), FakeTensor)), None)
    if fake_mode is None or len(traced) != len(example_inputs):
        return None
    constants = dict(gm.named_buffers())
    constants.update(gm.named_parameters())
    fakes = [fake_mode.from_tensor(sharded.local(value), static_shapes=True) for value in constants.values()]
    like = traced + list(constants.values())  # a DTensor's mesh, placements, shape, stride
    returns_dtensor = []

    def local_forward(*args):
        args = [type(t).from_local(a, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())
                if sharded.is_sharded(t) else a for a, t in zip(args, like)]
        inputs, values = args[:len(traced)], args[len(traced):]
        out = torch.func.functional_call(gm, dict(zip(constants, values)), tuple(inputs), strict=True)
        returns_dtensor.extend(v for v in pytree.tree_leaves(out) if sharded.is_sharded(v))
        return out

    with fake_mode:
        local_gm = make_fx(local_forward)(*[sharded.local(t) for t in traced], *fakes)
    if returns_dtensor:
        return None
    # the constants' placeholders become the graph's own buffers: their real local tensors
    for node, (name, value) in zip(list(local_gm.graph.find_nodes(op="placeholder"))[len(traced):], constants.items()):
        target = "wina_local_" + name.replace(".", "_")
        local_gm.register_buffer(target, sharded.local(value))
        with local_gm.graph.inserting_before(node):
            attr = local_gm.graph.get_attr(target)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        local_gm.graph.erase_node(node)
    _drop_identity_views(local_gm)
    _carry_dynamo_metadata(gm, local_gm)
    local_gm.graph.lint()
    local_gm.recompile()
    return local_gm


def _carry_dynamo_metadata(gm: fx.GraphModule, local_gm: fx.GraphModule) -> None:
    """What AOTAutograd reads from a dynamo graph, onto the local one: each input's source
    and whether it is static (a weight), and a source for each constant.  Without it
    CUDA graphs would take every weight for an activation and copy it at each replay."""
    from torch._dynamo.source import ConstantSource

    if "dynamo_compile_id" in gm.meta:  # how AOTAutograd tells a dynamo graph
        local_gm.meta["dynamo_compile_id"] = gm.meta["dynamo_compile_id"]
    for old, new in zip(gm.graph.find_nodes(op="placeholder"), local_gm.graph.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
        if "tensor_dict" in old.meta:
            new.meta["tensor_dict"] = old.meta["tensor_dict"]
    if hasattr(gm, "_param_name_to_source"):
        local_gm._param_name_to_source = {name: ConstantSource(name) for name, _ in
                                          [*local_gm.named_parameters(), *local_gm.named_buffers()]}


def _drop_identity_views(gm: fx.GraphModule) -> None:
    """Read through ``aten.view`` nodes that change nothing (DTensor's ``from_local`` makes
    one per wrap), so that q, k and v read one input node again, as the group pass needs."""
    for node in list(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.view.default)):
        source = node.args[0]
        before, after = source.meta.get("val"), node.meta.get("val")
        if (isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
                and statically_known_true(sym_eq((*before.shape, *before.stride()), (*after.shape, *after.stride())))):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)


def local_arguments(compiled, positions: list[int]):
    """``compiled`` (over local shards) as a callable taking the graph's own arguments."""
    positions = frozenset(positions)

    def run(*args):
        return compiled(*[arg._local_tensor if i in positions else arg for i, arg in enumerate(args)])

    return run
