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
from __future__ import annotations

import torch
import torch.fx as fx

from .analysis import DEFAULT_SOURCES, REFERENCE_SOURCES, VARIANTS, _Unsupported
from .plan import _plan
from .report import OrthogonalizeReport, RotatedGroup, _write_notes
from .rewrite import _rewrite

__all__ = ["orthogonalize", "OrthogonalizeReport", "RotatedGroup", "VARIANTS", "DEFAULT_SOURCES", "REFERENCE_SOURCES"]


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

