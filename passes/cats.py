"""CATS: mask a gated MLP's down-projection input by the magnitude of its activated gate.

For y = down(act(gate(x)) * up(x)) (found by ``find_gated_mlps``), CATS (arXiv 2404.08763,
ScalingIntelligence/CATS) keeps intermediate channel i only where |act(gate(x))_i| passes its
rule: above a threshold calibrated so that a fraction s of the channels falls below it, or,
with top-k, among the k largest of the token. The down projection then reads

    h = where(m, act(gate(x)) * up(x), 0)

so a zeroed channel needs neither its row of the up projection nor its column of the down
projection. The mask is plain torch ops (a ``KeepRule`` on
|act| with unit scores), which Inductor fuses into the producer elementwise ops; gating the
down projection afterwards with ``Gate(ones, KeepRule(threshold=0.0))`` lets the sparse kernel skip
the zeroed channels.

Invariant: only the down projection's input edge changes (it reads h instead of the
product); gate, up, activation and every other node are left as they were. With a rule that
keeps every channel, the graph computes what it computed before.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .find_linears import LinearSite
from .find_mlps import GatedMLP
from .graph_utils import add_constant
from .keep_rule import KeepRule


def mask_gated_mlps(
    gm: fx.GraphModule, masks: dict[int, KeepRule], mlps: dict[int, GatedMLP], sites: list[LinearSite]
) -> dict[int, fx.Node]:
    """Mask the down-projection input of ``mlps[i]`` for each i in ``masks`` (``gm`` changes
    in place); return {i: the masked input node}, what the gate pass then reads."""
    inputs = {}
    for down, rule in masks.items():
        mlp, site = mlps[down], sites[down]
        width = site.in_features
        ones = add_constant(gm, "wina_cats_ones", torch.ones(width, device=site.weight.device), before=site.node)
        with gm.graph.inserting_before(site.node):
            mask = rule.mask_node(gm.graph, mlp.act, ones)
            masked = gm.graph.call_function(torch.where, (mask, mlp.product, 0.0))
        site.node.replace_input_with(mlp.product, masked)
        inputs[down] = masked
    gm.graph.lint()
    gm.recompile()
    return inputs
