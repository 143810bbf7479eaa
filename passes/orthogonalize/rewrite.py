"""Orthogonalization, step 3: apply a ``_Plan`` to the graph.  New weights become
constants of the graph and their uses are re-pointed to them (the user's parameters are
never written); rotations go on the residual path or after a norm; folded norm scales
are dropped."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..find_linears import module_name_of
from ..graph_utils import add_constant
from .analysis import _linear_parts
from .plan import _Plan

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

