"""The graph as every wina-fx backend reads it (the sparse backend, calibration, greedy
allocation): the orthogonalization prepass when one is asked for, then the linears."""
from __future__ import annotations

from collections.abc import Mapping

import torch.fx as fx

from wina_fx import sharded

from .find_linears import LinearSite, find_linears
from .orthogonalize import OrthogonalizeReport, orthogonalize


def prepare(gm: fx.GraphModule, example_inputs, variant: str | None,
            sources: Mapping[str, str] | None = None) -> tuple[OrthogonalizeReport | None, list[LinearSite]]:
    """(the prepass report or None, the linears of ``gm``).  The prepass (``variant``, with
    ``sources`` or the default ones) rewrites ``gm`` only: its transformed weights are new
    constants, the model's parameters stay as they are."""
    if variant is not None and any(sharded.is_sharded(t) for t in example_inputs or ()):
        raise ValueError("wina-fx: orthogonalization (option orthogonalize, or recipe 'paper' for wina) is not "
                         "supported on a tensor-parallel (DTensor) graph yet; leave it off")
    report = orthogonalize(gm, example_inputs, variant, sources=dict(sources or {})) if variant is not None else None
    return report, find_linears(gm, example_inputs)
