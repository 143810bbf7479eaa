"""Small helpers shared by the passes."""
from __future__ import annotations

import torch
import torch.fx as fx


def add_constant(gm: fx.GraphModule, prefix: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register ``tensor`` as a new buffer of ``gm`` and return a get_attr node for it,
    inserted before ``before``. The buffer belongs to the compiled graph, not the model."""
    name, index = prefix, 0
    while hasattr(gm, name):
        index += 1
        name = f"{prefix}_{index}"
    gm.register_buffer(name, tensor)
    if hasattr(gm, "_param_name_to_source"):
        # A dynamo graph names a source for each of its buffers (AOTAutograd asserts it).
        from torch._dynamo.source import ConstantSource

        gm._param_name_to_source[name] = ConstantSource(name)
    with gm.graph.inserting_before(before):
        return gm.graph.get_attr(name)


def shared_constant(gm: fx.GraphModule, name: str, tensor: torch.Tensor) -> fx.Node:
    """The get_attr node of buffer ``name`` holding ``tensor`` (one node for the whole
    graph, before its first computation), registered on first use: passes that write into
    one tensor (the kept-channel counts) share it instead of each aliasing it."""
    if getattr(gm, name, None) is tensor:
        return next(n for n in gm.graph.nodes if n.op == "get_attr" and n.target == name)
    if hasattr(gm, name):
        raise ValueError(f"graph buffer {name!r} holds another tensor")
    return add_constant(gm, name, tensor, before=first_non_placeholder(gm))


def first_non_placeholder(gm: fx.GraphModule) -> fx.Node:
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            return node
    raise ValueError("graph has no computation")
