"""CATS (arXiv 2404.08763): in each gated MLP, keep the intermediate channels of largest
|act(gate(x))|, masking the down projection's input (``passes/cats.py`` rewrites the graph;
the down projection is then gated to skip the zeroed channels)."""
from __future__ import annotations

import torch
import torch.fx as fx

from wina_fx.passes.cats import mask_gated_mlps
from wina_fx.passes.find_linears import LinearSite
from wina_fx.passes.find_mlps import find_gated_mlps

from .base import Method, unit_scores
from .plan import Plan, dense_reason, keep_rule, row, zero_skipping_gate

EXPERTS = "cats masks dense gated MLPs only, not the experts of an expert op"
ONLY_MLP = "cats sparsifies only the MLP (not the down projection of a gated MLP act(gate(x)) * up(x))"


class Cats(Method):
    """The sparsity of an MLP is the one its down projection's name gets; every other
    linear stays dense, with the reason in the report."""

    name = "cats"

    def score(self, weight: torch.Tensor) -> torch.Tensor:
        """Ones: an intermediate channel's importance is |act(gate(x))_i| alone."""
        return unit_scores(weight)

    def observed_inputs(self, sites: list[LinearSite]) -> dict[int, fx.Node]:
        return {index: mlp.act for index, mlp in find_gated_mlps(sites).items()}

    def plan(self, config, sites: list[LinearSite]) -> Plan:
        mlps = find_gated_mlps(sites)
        roles = {}
        for mlp in mlps.values():
            if mlp.fused:
                roles[mlp.gate] = "cats computes the fused gate/up projection dense (its gate half decides the mask)"
            else:
                roles[mlp.gate] = "cats computes the gate projection dense (its output decides the mask)"
                roles[mlp.up] = "cats masks its output rows but computes them dense (no row-skipping op yet)"
        masks, gates, rows = {}, {}, []
        for index, site in enumerate(sites):
            if index in mlps:
                target = config.sparsity_for(site.name)
                reason = dense_reason(config, site, target)
            else:
                target = None
                reason = site.dense_reason or roles.get(index, EXPERTS if site.expert is not None else ONLY_MLP)
            if reason is None:
                masks[index] = keep_rule(config, site, target)
                gates[index] = zero_skipping_gate(site)
            rows.append(row(site, reason, target))
        rewrite = (lambda gm: mask_gated_mlps(gm, masks, mlps, sites)) if masks else None
        return Plan(gates, rows, rewrite)
