"""Launchers of the wina sparse linear  y = W (x * m) + b  (Triton, CUDA or TRITON_INTERPRET=1).

``threshold_linear`` and ``topk_linear`` compute what their namesakes in
``kernels/reference.py`` compute, but take the weight transposed: ``weight_t`` is
(K, N) contiguous, so a dropped input channel is one skipped contiguous row.

Paths, picked from the number of tokens M alone (shapes only: no host sync, no
data-dependent Python, so the launchers can be captured in CUDA graphs):

* ``gemv``  (M <= GEMV_MAX_M): ``_gemv_kernel`` decides the mask, compacts the kept
  channel ids and reads only those weight rows; split-K with an in-kernel fixup.
  One launch (plus a 4-byte-per-tile ticket memset when split-K).
* ``gemm``  (M <= SPARSE_MAX_M): ``_gemm_masked_kernel`` masks x in-kernel and reads
  all of the weight (kept as a measured alternative; the dispatch does not pick it).
* ``dense`` (larger M): ``_prep_kernel`` writes x * mask, then cuBLAS ``addmm``.

``topk_linear`` first runs ``_prep_kernel`` (exact per-token top-k by bisection on the
float bits) to write x * mask, then the same paths keep the channels with x != 0.
Every launch goes through ``torch.library.wrap_triton`` so that a ``triton_op`` built
on these launchers exposes the kernels to Inductor.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from . import sparse_linear_kernels as kern

# Dispatch rule, measured on an H100 by `benchmarks/kernels.py --sweep` ("rule_*" rows of
# benchmarks/results/kernels_h100_sweep*.json; benchmarks/NOTES.md): with a per-token mask and
# M = 2..256 tokens, time / cuBLAS was 0.95-1.19 for the dense fallback (mask kernel + cuBLAS),
# 0.94-8.6 for the masked GEMM, 1.09-24 for a 16-token kept-row gather (since removed) and, for
# M <= 8, 0.40 (90 % sparse) to 3.8 (dense) for one sparse GEMV per token.  So M >= 2 falls back.
GEMV_MAX_M = 1      # tokens handled by the sparse GEMV
SPARSE_MAX_M = 1    # up to this many tokens: in-kernel masking (gemm); above: dense fallback
TOPK_MAX_K = 32768  # the top-k prep holds a token's row in registers


def _patch_triton_interpreter() -> None:
    """Work around two bugs of Triton 3.6's interpreter (TRITON_INTERPRET=1, CPU tests only).

    1. It keeps scalars as 1-element arrays and converts them with ``int(array)``, which
       NumPy 2.4 refuses for arrays with a dimension, so ``for i in range(start, end)``
       fails with "only 0-dimensional arrays can be converted to Python scalars".
    2. It stores bfloat16 as uint16 and ``tl.dot`` multiplies those integers.
    Applied once, only when the interpreter is on; compiled kernels are untouched.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    if getattr(interp, "_wina_patched", False):
        return
    patch_tensor = interp._patch_lang_tensor

    def patched_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    create_dot = interp.InterpreterBuilder.create_dot

    def as_fp32(h):
        if h.dtype != tl.bfloat16:
            return h
        data = interp._convert_float(h.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interp.TensorHandle(data.reshape(h.data.shape), tl.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return create_dot(self, as_fp32(a), as_fp32(b), d, input_precision, max_num_imprecise_acc)

    interp._patch_lang_tensor = patched_tensor
    interp.InterpreterBuilder.create_dot = patched_dot
    interp._wina_patched = True


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_triton_interpreter()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: pretend H100 so the split-K paths are exercised


def _empty(shape, dtype, device) -> Tensor:
    """Every buffer a launcher does not zero itself; tests swap in a NaN-filled version."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, grid, *args, **kwargs):
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _gemv_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    """Tiles of _gemv_kernel.  About one program per SM (SPLIT_K programs share an output
    tile): the best of 8 candidates over 5 shapes x 3 sparsities on an H100 (geometric mean
    3 % and worst 12 % above the per-case best; GEMV_CANDIDATES in benchmarks/kernels.py)."""
    block_n = 128 if dtype.itemsize == 2 else 64
    split = max(1, min(triton.cdiv(sms, triton.cdiv(N, block_n) * M), K // 256, 64))
    return dict(BLOCK_N=block_n, BLOCK_R=64, SPLIT_K=split, STAGES=3, num_warps=4)


def _gemm_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 128
    block_k = 64 if dtype.itemsize == 2 else 32
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = max(1, min(triton.cdiv(sms, tiles), triton.cdiv(K, 4 * block_k), 16))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                num_warps=4, num_stages=4 if dtype.itemsize == 2 else 2)


def _choose_path(M: int) -> str:
    if M <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if M <= SPARSE_MAX_M else "dense"


def _prep(x: Tensor, score: Tensor, threshold: float, k: int | None, n_cnt: int = 0):
    """x * mask by _prep_kernel (threshold, or exact top-k when k is given); zeroes n_cnt tickets."""
    M, K = x.shape
    xm = _empty((M, K), x.dtype, x.device)
    cnt = _empty((max(n_cnt, 1),), torch.int32, x.device)  # zeroed by the kernel
    if k is not None:
        if K > TOPK_MAX_K:
            raise NotImplementedError(f"topk_linear supports K <= {TOPK_MAX_K}, got K={K}")
        block_k = max(1024, triton.next_power_of_2(K))
        warps = max(4, min(32, block_k // 512))
    else:
        block_k, warps = 1024, 4
    _launch(kern._prep_kernel, (M, triton.cdiv(K, block_k)), x, score, xm, cnt,
            M, K, n_cnt, x.stride(0), float(threshold), 0 if k is None else int(k),
            TOPK=k is not None, BLOCK_K=block_k, num_warps=warps)
    return xm, cnt


def _sparse_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor,
                   threshold: float = 0.0, k: int | None = None, *, path: str | None = None,
                   config: dict | None = None, out: Tensor | None = None) -> Tensor:
    """Shared body of both launchers; ``path``/``config`` override the dispatch (tests, benchmarks)."""
    lead, K = x.shape[:-1], x.shape[-1]
    if weight_t.dim() != 2 or weight_t.shape[0] != K:
        raise ValueError(f"weight_t must be (K, N) with K={K}, got {tuple(weight_t.shape)}")
    if score.shape != (K,):
        raise ValueError(f"score must be ({K},), got {tuple(score.shape)}")
    N = weight_t.shape[1]
    if K * max(N, 1) >= 2**31:
        raise ValueError("weight_t has 2**31 elements or more: int32 offsets would overflow")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight_t = weight_t.contiguous()
    score = score.to(device=x.device, dtype=torch.float32).contiguous()
    if bias is not None:
        bias = bias.contiguous()
    M = x2.shape[0]
    if out is None:
        out = _empty((M, N), x.dtype, x.device)
    if k is not None:
        k = max(0, min(int(k), K))
    if M == 0 or N == 0:
        return out.reshape(*lead, N)
    if K == 0:
        out.zero_() if bias is None else out.copy_(bias.expand(M, N))
        return out.reshape(*lead, N)

    path = path or _choose_path(M)
    sms = _num_sms(x.device)
    has_bias = bias is not None
    if path == "dense":
        xm, _ = _prep(x2, score, threshold, k)
        if has_bias:
            torch.addmm(bias, xm, weight_t, out=out)
        else:
            torch.mm(xm, weight_t, out=out)
        return out.reshape(*lead, N)

    if path == "gemv":
        cfg = dict(config or _gemv_config(M, N, K, x.dtype, sms))
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), cfg["SPLIT_K"], M)
        k_per = triton.cdiv(triton.cdiv(K, cfg["SPLIT_K"]), 16) * 16
        cfg.setdefault("BLOCK_KS", max(256, min(triton.next_power_of_2(k_per), 4096)))
        n_tiles = grid[0] * M
    elif path == "gemm":
        cfg = dict(config or _gemm_config(M, N, K, x.dtype, sms))
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), cfg["SPLIT_K"])
        n_tiles = grid[0] * grid[1]
    else:
        raise ValueError(f"unknown path {path!r}; choose from gemv, gemm, dense")
    split = cfg.pop("SPLIT_K")
    n_cnt = n_tiles if split > 1 else 0  # one split-K ticket per output tile
    if k is None:  # threshold: the kernel applies the rule; tickets zeroed here (if any)
        a, mode = x2, kern.KEEP_THRESHOLD
        cnt = torch.zeros((n_cnt,), dtype=torch.int32, device=x.device) if n_cnt else _empty((1,), torch.int32, x.device)
    else:  # top-k: the prep writes x * mask (exact k) and zeroes the tickets
        (a, cnt), mode = _prep(x2, score, threshold, k, n_cnt), kern.KEEP_NONZERO
    part = _empty((split, M, N) if split > 1 else (1,), torch.float32, x.device)
    args = [a, weight_t, bias if has_bias else out, score, out, part, cnt]
    if path == "gemv":
        args.append(_empty((M * split * grid[0] * k_per,), torch.int32, x.device))  # kept-id scratch
        args += [M, N, K, a.stride(0), out.stride(0), float(threshold), split, k_per]
        _launch(kern._gemv_kernel, grid, *args, MODE=mode, HAS_BIAS=has_bias, **cfg)
    else:
        args += [M, N, K, a.stride(0), out.stride(0), float(threshold), split]
        _launch(kern._gemm_masked_kernel, grid, *args, MODE=mode, HAS_BIAS=has_bias,
                IEEE=x.dtype == torch.float32, **cfg)
    return out.reshape(*lead, N)


def threshold_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor,
                     threshold: float) -> Tensor:
    """y = (x * m) @ weight_t + bias with m_i = |x_i| * score_i > threshold, decided in-kernel.

    x (M, K) fp16/bf16/fp32; weight_t (K, N) contiguous; bias (N,) or None; score (K,)
    float32.  Returns (M, N) in x's dtype; accumulation in float32.
    """
    return _sparse_linear(x, weight_t, bias, score, threshold=threshold)


def topk_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor, k: int) -> Tensor:
    """y = (x * m) @ weight_t + bias, m keeping per token exactly k channels of largest |x_i| * score_i.

    The k-th largest importance is found in-kernel by bisection on its float bits (no
    sort); among channels tied at it, the lowest indices are kept, so exactly
    min(max(k, 0), K) channels are kept per token.
    """
    return _sparse_linear(x, weight_t, bias, score, k=k)
