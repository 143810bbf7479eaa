"""Tensor parallelism: the wina ops on DTensors (``torch.distributed.tensor``).

A model sharded with ``parallelize_module`` (ColwiseParallel / RowwiseParallel over a
DeviceMesh) reaches the backend as one graph whose weights are DTensors.  The gate pass
rewrites its linears as on one process; DTensor then runs each sparse op on the local
shards, by the strategies registered here:

* column-parallel (W sharded over its outputs, ``Shard(0)``; W^T ``Shard(1)``): every rank
  sees the whole input x and the whole score, so it keeps exactly the channels one process
  keeps (WINA's column norms of the full weight are one all-reduce, at compile time);
  its output columns are ``Shard(-1)``.
* row-parallel (W sharded over its inputs, ``Shard(1)``; W^T ``Shard(0)``): each rank holds
  a slice of the channels of x, their scores and weight rows; a threshold rule decides each
  channel alone, so the masks are exactly one process's; the output is a ``Partial`` sum
  (the all-reduce RowwiseParallel already has).  A top-k rule keeps k channels per rank's
  slice: the gate pass gives it round(k * K_local / K), the same share ("top-k per shard").
  Without a row-parallel strategy for a linear with a bias (its bias would be added once per
  rank), DTensor falls back to a replicated one: correct, with the weight gathered.
* anything else: everything replicated.

Every rank traces the same graph and takes the same decisions (no rank waits on another).
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor.experimental import register_sharding
except ImportError:  # a torch without distributed
    DTensor = None


def is_sharded(tensor) -> bool:
    """``tensor`` is a DTensor (its placements decide how the sparse op runs)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def column_norms(weight) -> "DTensor":
    """||W[:, i]||_2 of a DTensor weight (N, K) as a DTensor: replicated for a column-parallel
    W (the sum over the sharded outputs is all-reduced), sharded like the inputs for a
    row-parallel one."""
    return weight.detach().float().square().sum(dim=0).sqrt()


def unit_scores(weight) -> "DTensor":
    """Ones over the inputs of a DTensor weight, placed as ``column_norms`` places scores
    (computed from the weight so that DTensor gives them that placement; a NaN or inf in the
    weight still gives a score of 1)."""
    return (weight.detach().float().sum(dim=0) * 0.0).nan_to_num(0.0, 0.0, 0.0) + 1.0


def local(tensor):
    """The tensor holding the values: a DTensor's local shard, else the tensor itself."""
    return tensor._local_tensor if is_sharded(tensor) else tensor


def wrapped_local(node):
    """The node a chain of ``DTensor.from_local`` calls wraps: q, k and v each wrap the same
    hidden state in a DTensor of their own, and still read one input."""
    while getattr(node, "op", None) == "call_function" and getattr(node.target, "__name__", None) == "from_local":
        node = node.args[0]
    return node


def row_parallel(weight) -> bool:
    """W (N, K) is sharded over its inputs (RowwiseParallel)."""
    return is_sharded(weight) and any(isinstance(p, Shard) and p.dim % 2 == 1 for p in weight.placements)


def local_inputs(weight) -> int:
    """Input channels of this rank's shard of W (N, K)."""
    return weight.to_local().shape[1] if is_sharded(weight) else weight.shape[1]


def _strategies(x, bias, extra: int):
    """(output, inputs) placements for (x, weight_t, bias, score, *extra scalars)."""
    last = Shard(x.ndim - 1)
    scalars = [None] * extra
    options = [([Replicate()], [Replicate(), Replicate(), None if bias is None else Replicate(), Replicate(), *scalars]),
               ([last], [Replicate(), Shard(1), None if bias is None else Shard(0), Replicate(), *scalars])]
    if bias is None:
        options.append(([Partial()], [last, Shard(0), None, Shard(0), *scalars]))
    return options


if DTensor is not None:
    import wina_fx.ops  # noqa: F401  (defines torch.ops.wina)

    @register_sharding(torch.ops.wina.threshold_linear.default)
    def _threshold_linear(x, weight_t, bias, score, threshold, sparsity_hint=0.0):
        return _strategies(x, bias, 2)

    @register_sharding(torch.ops.wina.topk_linear.default)
    def _topk_linear(x, weight_t, bias, score, k):
        return _strategies(x, bias, 1)
