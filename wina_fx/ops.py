"""The wina sparse-linear custom ops (``torch.ops.wina.*``).

The weight arrives transposed, ``weight_t`` of shape (K, N), so that each input channel
the kernel keeps is one contiguous row (the gate pass passes a view of the user's weight
on the CPU and a contiguous copy on CUDA). On CUDA the ops run the Triton launchers of
``wina_fx.kernels.sparse_linear``; elsewhere the torch reference of
``wina_fx.kernels.reference``. They are defined with ``torch.library.triton_op`` when
Triton is importable, so Inductor traces into them and sees the Triton kernels inside
the compiled graph (and, on the CPU, fuses the reference's masking with its neighbours).
"""
from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from wina_fx.kernels import reference

HAVE_TRITON = importlib.util.find_spec("triton") is not None


def _define(name: str):
    if HAVE_TRITON:
        return lambda fn: torch.library.triton_op(name, fn, mutates_args=())
    return lambda fn: torch.library.custom_op(name, fn, mutates_args=())


def _launchers():
    from wina_fx.kernels import sparse_linear

    return sparse_linear


_WORKSPACES: dict[torch.device, list[Tensor]] = {}


@torch.library.custom_op("wina::workspace", mutates_args=())
def workspace(device: torch.device, numel: int) -> Tensor:
    """int32 zeros (at least ``numel``) shared by the sparse GEMV launches on ``device``.

    The split-K tickets of the CUDA kernels live here: each launch leaves it all zeros as
    it found it, so one buffer allocated once serves every later launch with no memset
    (under Inductor a memset would be one more kernel per linear).  Launches on one
    device must not run concurrently on different streams (decode runs them in order on
    one).  Buffers outgrown are kept: a captured CUDA graph may still point at them.  The
    result is always the first ``_workspace_numel(numel)`` elements of the newest buffer, the
    shape the fake kernel gives (Inductor checks it), however large an earlier call made it."""
    buffers = _WORKSPACES.setdefault(torch.device(device), [])
    size = _workspace_numel(numel)
    if not buffers or buffers[-1].numel() < size:
        buffers.append(torch.zeros(size, dtype=torch.int32, device=device))
    return buffers[-1][:size]


def _workspace_numel(numel: int) -> int:
    return max(numel, 1 << 16)


@workspace.register_fake
def _(device, numel):
    return torch.empty(_workspace_numel(numel), dtype=torch.int32, device=device)


def _workspace(x: Tensor, n_out: int, rows: int | None = None) -> Tensor:
    launchers = _launchers()
    return torch.ops.wina.workspace(x.device, launchers.workspace_size(n_out, rows or launchers.GEMV_MAX_M))


@_define("wina::topk_linear")
def topk_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor, k: int) -> Tensor:
    """y = (x * m) @ weight_t + b, m keeping per token the k channels of largest |x_i| * score_i."""
    if x.is_cuda:
        return _launchers().topk_linear(x, weight_t, bias, score, k, _workspace(x, weight_t.shape[1]))
    return reference.topk_linear(x, weight_t.t(), bias, score, k)


@_define("wina::threshold_linear")
def threshold_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor, threshold: float,
                     sparsity_hint: float = 0.0) -> Tensor:
    """y = (x * m) @ weight_t + b, m keeping the channels with |x_i| * score_i > threshold.
    ``sparsity_hint`` (the calibrated sparsity) picks the CUDA kernel; results do not depend on it."""
    if x.is_cuda:
        return _launchers().threshold_linear(x, weight_t, bias, score, threshold, sparsity_hint,
                                             _workspace(x, weight_t.shape[1]))
    return reference.threshold_linear(x, weight_t.t(), bias, score, threshold)


@_define("wina::threshold_linear_group")
def threshold_linear_group(x: Tensor, weight_t: Tensor, bias: Tensor | None, scores: Tensor,
                           thresholds: list[float], sizes: list[int], sparsity_hint: float = 0.0) -> Tensor:
    """Threshold linears sharing x, side by side: weight_t (K, sum(sizes)), scores (G, K);
    linear g keeps |x_i| * scores[g, i] > thresholds[g]. One launch on CUDA at one token."""
    if x.is_cuda:
        return _launchers().threshold_linear_group(x, weight_t, bias, scores, thresholds, sizes, sparsity_hint,
                                                   _workspace(x, weight_t.shape[1]))
    return reference.threshold_linear_group(x, weight_t.t(), bias, scores, thresholds, sizes)


# Opaque to Inductor (a custom_op, not a triton_op): there is nothing for it to fuse, and
# a traced user kernel is functionalized by torch's analysis of what it writes; a first
# version, whose expert weight pointer reached a store address through a called function,
# had the whole 3-D weight cloned and written back at every call (H200 run 31; the
# kernels no longer do that: tests/test_kernel_effects.py).
@torch.library.custom_op("wina::expert_threshold_linear", mutates_args=())
def expert_threshold_linear(x: Tensor, expert: Tensor, weight_t: Tensor, scores: Tensor, thresholds: Tensor,
                            sparsity_hint: float = 0.0) -> Tensor:
    """Rows x (S, K) of a mixture-of-experts op, row s through the threshold linear of expert
    expert[s]: weight_t (E, K, N), scores (E, K), thresholds (E,).  One launch on CUDA."""
    if x.is_cuda:
        return _launchers().expert_threshold_linear(x, expert, weight_t, scores, thresholds, sparsity_hint,
                                                    _workspace(x, weight_t.shape[2], x.shape[0]))
    return reference.expert_threshold_linear(x, expert, weight_t, scores, thresholds)


@expert_threshold_linear.register_fake
def _(x, expert, weight_t, scores, thresholds, sparsity_hint=0.0):
    return x.new_empty((x.shape[0], weight_t.shape[2]))


@torch.library.custom_op("wina::count_kept", mutates_args=("counts",))
def count_kept(counts: Tensor, slot: int, x: Tensor, score: Tensor, k: int, threshold: float) -> None:
    """Add to counts[slot] the (kept, seen) channel counts of one sparse linear's input.

    k >= 0 selects top-k, k < 0 the threshold rule; the mask is the one the linear uses.
    """
    if k >= 0:
        mask = reference.topk_mask(x, score, k)
    else:
        mask = reference.threshold_mask(x, score, threshold)
    counts[slot, 0] += mask.sum()
    counts[slot, 1] += mask.numel()


@torch.library.custom_op("wina::count_expert_kept", mutates_args=("counts",))
def count_expert_kept(counts: Tensor, slots: list[int], keep: Tensor, expert: Tensor) -> None:
    """Add to counts[slots[e]] the (kept, seen) channel counts of the rows routed to expert
    e, for every expert e with a slot >= 0; ``keep`` (S, K) is the mask the expert op uses,
    ``expert`` (S,) each row's expert."""
    experts = len(slots)
    kept = torch.zeros(experts, dtype=torch.float64, device=keep.device).index_add_(
        0, expert, keep.sum(-1).to(torch.float64))
    seen = torch.bincount(expert, minlength=experts).to(torch.float64) * keep.shape[-1]
    index = torch.tensor(slots, device=counts.device)
    valid = index >= 0
    counts.index_add_(0, index[valid], torch.stack([kept, seen], dim=1).to(counts.device)[valid])


@count_expert_kept.register_fake
def _(counts, slots, keep, expert):
    return None


@topk_linear.register_fake
def _(x, weight_t, bias, score, k):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@threshold_linear.register_fake
def _(x, weight_t, bias, score, threshold, sparsity_hint=0.0):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@threshold_linear_group.register_fake
def _(x, weight_t, bias, scores, thresholds, sizes, sparsity_hint=0.0):
    return x.new_empty((*x.shape[:-1], weight_t.shape[1]))


@count_kept.register_fake
def _(counts, slot, x, score, k, threshold):
    return None


# ---------------------------------------------------------------- autograd
# The gradient of the masked function with the mask held constant (straight-through on
# the mask): y = (x * m) @ W^T + b gives dx = m * (g @ W), dW^T = (x * m)^T g, db = sum g.
# The mask is recomputed from the saved x by the same rule (torch ops: they run, and
# fuse, on any device); the kernels break top-k ties by lowest index, the reference by
# torch.topk, which only differs on exactly tied importances.


def _save(ctx, x, weight_t, bias, score, rule):
    ctx.save_for_backward(x, weight_t, score)
    ctx.rule, ctx.has_bias = rule, bias is not None


def _masked_grads(ctx, grad, masks_and_columns):
    """(dx, dweight_t, dbias) for linears side by side: masks_and_columns[g] = (mask of x
    for linear g, its column slice of weight_t and of grad)."""
    x, weight_t, _ = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad = grad.to(x.dtype)
    dx = torch.zeros_like(x) if need_x else None
    parts = []
    for mask, cols in masks_and_columns:
        g = grad[..., cols]
        m = mask.to(x.dtype)
        if need_x:
            dx = dx + (g @ weight_t[:, cols].t()) * m
        if need_w:
            parts.append((x * m).reshape(-1, x.shape[-1]).t() @ g.reshape(-1, g.shape[-1]))
    dw = torch.cat(parts, dim=1) if need_w else None
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and need_b else None
    return dx, dw, db


def _topk_setup(ctx, inputs, output):
    x, weight_t, bias, score, k = inputs
    _save(ctx, x, weight_t, bias, score, k)


def _topk_backward(ctx, grad):
    x, weight_t, score = ctx.saved_tensors
    mask = reference.topk_mask(x, score, ctx.rule)
    return (*_masked_grads(ctx, grad, [(mask, slice(None))]), None, None)


def _threshold_setup(ctx, inputs, output):
    x, weight_t, bias, score, threshold, *_ = inputs
    _save(ctx, x, weight_t, bias, score, threshold)


def _threshold_backward(ctx, grad):
    x, weight_t, score = ctx.saved_tensors
    mask = reference.threshold_mask(x, score, ctx.rule)
    return (*_masked_grads(ctx, grad, [(mask, slice(None))]), None, None, None)


def _group_setup(ctx, inputs, output):
    x, weight_t, bias, scores, thresholds, sizes, *_ = inputs
    _save(ctx, x, weight_t, bias, scores, (list(thresholds), list(sizes)))


def _group_backward(ctx, grad):
    x, weight_t, scores = ctx.saved_tensors
    thresholds, sizes = ctx.rule
    pieces, start = [], 0
    for score, threshold, size in zip(scores, thresholds, sizes):
        pieces.append((reference.threshold_mask(x, score, threshold), slice(start, start + size)))
        start += size
    return (*_masked_grads(ctx, grad, pieces), None, None, None, None)


torch.library.register_autograd("wina::topk_linear", _topk_backward, setup_context=_topk_setup)
torch.library.register_autograd("wina::threshold_linear", _threshold_backward, setup_context=_threshold_setup)
torch.library.register_autograd("wina::threshold_linear_group", _group_backward, setup_context=_group_setup)
