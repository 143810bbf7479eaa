"""Launchers of the wina sparse linear  y = W (x * m) + b  (Triton, CUDA or TRITON_INTERPRET=1).

``threshold_linear`` and ``topk_linear`` compute what their namesakes in
``kernels/reference.py`` compute, but take the weight transposed: ``weight_t`` is
(K, N) with unit column stride (any row stride >= N: a linear stored beside its siblings
is read in place), so a dropped input channel is one skipped contiguous row.

Paths, picked from the number of tokens M, the shape and the calibrated sparsity
(shapes and Python constants: no host sync, no data-dependent Python, so the launchers
can be captured in CUDA graphs):

* keep-all (threshold -inf, what calibration gives for sparsity 0, or k >= K): cuBLAS,
  nothing else.
* M = 1: ``_gemv_choice`` picks the kernel and tiles measured best on an H200:
  ``gemv_masked`` (``_gemv_masked_kernel``: decides the mask and loads only the kept
  weight rows by masked loads) below the shape's crossover sparsity, ``gemv``
  (``_gemv_kernel``: compacts the kept channel ids, then streams full tiles of kept rows)
  from it; both in wide, short tiles (512 or 1024 columns x 8 rows) whose loads go straight
  into registers one step ahead, a bf16 weight read as int32 column pairs.
  Split-K partial sums meet by float32 atomics (or, under
  ``torch.use_deterministic_algorithms(True)``, in a fixed order through self-resetting
  tickets) in a workspace allocated once per device (``wina_fx.ops`` passes it), so one
  launch per linear.
* M = 2 (two sequences decoding together): ``_pair_choice``, ``gemv_masked`` with both
  tokens in each program (TOKENS 2): a weight row is read once when either token keeps it
  and each token multiplies its own kept channels; outputs of at most 2048 columns stay on
  ``dense`` below, where cuBLAS was ahead.
* ``gemm``: ``_gemm_masked_kernel`` masks x in-kernel and reads all of the weight (a
  measured alternative for M >= 2; never dispatched).
* ``gemv_union`` (M <= 16): ``_gemv_union_kernel`` reads once the weight rows that any
  of the tokens keeps (the union of their masks) and multiplies each token's own kept
  channels; for a batch of sequences decoding together.  On real text the union leaves
  27 % of the rows unread at 2 tokens and 50 % sparsity, 9 % at 4
  (``benchmarks/batch_union.py``).  Never dispatched: on the H200 its tensor-core tiles
  reached 0.10-0.70x cuBLAS, its register tiles (ROW_SUM) 0.27-1.00x at 2-4 tokens
  (``kernels_h200_batch.json``, ``kernels_h200_batch_session13.json``).
* ``dense`` (M >= 3, and narrow outputs at M = 2): x * mask, then cuBLAS.  The mask is
  ``_prep_kernel`` eagerly and plain torch ops when torch.compile traces the op, so that
  Inductor fuses it into the kernel producing x.

``topk_linear`` first writes x * mask (eagerly ``_prep_kernel``: exact per-token top-k by
bisection on the float bits; traced, torch ops), then the same paths keep the channels
with x != 0.
Every launch goes through ``torch.library.wrap_triton`` so that a ``triton_op`` built
on these launchers exposes the kernels to Inductor.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os

import torch
import triton
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import reference
from . import sparse_linear_kernels as kern

# Dispatch by token count, measured on an H100 and an H200 (benchmarks/NOTES.md): with a
# per-token mask, M = 3..256 tokens ran no faster on any sparse kernel tried than x * mask
# fused into the producer, then cuBLAS.  At M = 2 the masked GEMV with both tokens in each
# program reads the union of their rows (75 % at 50 % sparsity) and beat cuBLAS (session 18).
GEMV_MAX_M = 2      # tokens handled by the sparse GEMV (two: both in each program, TOKENS 2)
SPARSE_MAX_M = 1    # up to this many tokens: in-kernel masking (gemm); above: dense fallback
UNION_MAX_M = 16    # tokens one program of the union kernel holds (never dispatched: slower than cuBLAS)
TOPK_MAX_K = 32768  # the top-k prep holds a token's row in registers


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # interpreter: pretend H100 so the split-K paths are exercised


@functools.lru_cache(maxsize=None)
def hopper(device: torch.device) -> bool:
    """sm_90 or newer: the GEMVs let the next kernel launch early and wait for the one before
    (programmatic dependent launch, sparse_linear_kernels.py); never under the interpreter,
    which has no such instruction."""
    return (device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def _empty(shape, dtype, device) -> Tensor:
    """Every buffer a launcher does not zero itself; tests swap in a NaN-filled version."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, grid, *args, **kwargs):
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


def _gemv_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    """Tiles of _gemv_kernel: about one program per SM (SPLIT_K programs share an output
    tile); chosen among GEMV_CANDIDATES of benchmarks/kernels.py (benchmarks/NOTES.md)."""
    block_n = 128 if dtype.itemsize == 2 else 64
    split = max(1, min(triton.cdiv(sms, triton.cdiv(N, block_n) * M), K // 256, 64))
    return dict(BLOCK_N=block_n, BLOCK_R=64, SPLIT_K=split, STAGES=3, REDUCE=0, num_warps=4)


def _gemv_masked_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    """Tiles of _gemv_masked_kernel, about two programs per SM (H200 runs, benchmarks/NOTES.md):
    32 columns x 256 rows per step, 4 warps; outputs 2.5-5x wider than the input and under
    16384 (4096x14336), 64 x 128 with 2 warps; wider outputs (N >= 16384) 64 x 128 with 4
    warps, except a single linear 2.5-5x wider than its input (5120x17920), 32 x 256.
    Why the warps matter: a thread that loads under 4 bytes of x per step (one fp16) cannot
    use an asynchronous copy, so each step waits for x before issuing its weight rows; the
    2-warp and 256-row tiles avoid that (64 x 128 with 4 warps does not, and still measured
    best on the gate/up groups).
    Since session 16 the one-token dispatch (_gemv_choice) takes its own wide tiles; these
    serve a caller naming the path (tests, benchmarks, a few tokens run per token).
    REDUCE=0 (a second reduce launch) needs no zeroed buffer."""
    block_n, block_k, warps = (64, 128, 4) if N >= 16384 else (32, 256, 4)
    if _widening(N, K):
        block_n, block_k, warps = (32, 256, 4) if N >= 16384 else (64, 128, 2)
    split = max(1, min(triton.cdiv(2 * sms, triton.cdiv(N, block_n) * M), K // 256, 32))
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=3, REDUCE=0, num_warps=warps)


def _widening(N: int, K: int) -> bool:
    """A single up-projection shape: 2.5 <= N / K <= 5 (4096x14336, 5120x17920)."""
    return 2.5 <= N / K <= 5


def _gemm_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64
    block_n = 128
    block_k = 64 if dtype.itemsize == 2 else 32
    tiles = triton.cdiv(N, block_n) * triton.cdiv(M, block_m)
    split = max(1, min(triton.cdiv(sms, tiles), triton.cdiv(K, 4 * block_k), 16))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, REDUCE=1,
                num_warps=4, num_stages=4 if dtype.itemsize == 2 else 2)


def _gemv_union_config(M: int, N: int, K: int, dtype: torch.dtype, sms: int) -> dict:
    """Tiles of _gemv_union_kernel: every token in one program (tensor-core tiles of 16
    rows), about one program per SM.  Not yet measured on a GPU (benchmarks/NOTES.md)."""
    split = max(1, min(triton.cdiv(sms, triton.cdiv(N, 64)), K // 256, 64))
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=32, SPLIT_K=split, STAGES=3, REDUCE=0, num_warps=4)


_CONFIGS = {"gemv": _gemv_config, "gemv_masked": _gemv_masked_config, "gemm": _gemm_config,
            "gemv_union": _gemv_union_config}


# Weights of at least this many elements (the Llama-3-8B MLP linears, 5120x17920) switch to
# compacted rows at a lower sparsity than the smaller ones (q/k/v, o).
WIDE_MIN_WEIGHT = 1 << 25
# Weights of at most this many elements (o_proj of Llama-3-8B, its tensor-parallel shards of o
# and q/k/v) stream 16-row steps, 4 programs an SM, from 40 % (session 17).
DEEP_MAX_WEIGHT = 1 << 24


def _wide_config(path: str, K: int, sizes: tuple[int, ...], sms: int, block_n: int, rows: int, per_sm: int,
                 reduce: int) -> tuple[str, dict]:
    """Wide, short tiles (ROW_SUM): block_n columns, one 16-byte vector of each row per thread
    (block_n / 256 warps), so each kept row is read in runs of 2 block_n contiguous bytes, and
    `rows` rows a step summed in the thread, the loads straight into registers one step ahead;
    a bf16 weight read as int32 pairs (UNPACK, where the launcher finds it fits);
    split-K to about per_sm programs per SM (at most 32 splits when the last ticket sums them:
    it holds one partial tile per split).  The output tiles are counted per linear of a group,
    as the kernel lays them out (a 7168-wide linear is 7 tiles of 1024)."""
    tiles = sum(triton.cdiv(n, block_n) for n in sizes)
    split = max(1, min(triton.cdiv(per_sm * sms, tiles), K // (2 * rows), 128 if reduce == 2 else 32))
    return path, {"BLOCK_N": block_n, "BLOCK_K" if path == "gemv_masked" else "BLOCK_R": rows, "SPLIT_K": split,
                  "STAGES": 1, "REDUCE": reduce, "num_warps": block_n // 256, "ROW_SUM": True, "UNPACK": True}


def _split_k_reduce() -> int:
    """How the dispatched GEMVs' split-K partial sums meet: float32 atomics (REDUCE 2), or under
    ``torch.use_deterministic_algorithms(True)`` a fixed order by the last program's ticket (1)."""
    return 1 if torch.are_deterministic_algorithms_enabled() else 2


def _gemv_choice(N: int, K: int, sms: int, sparsity_hint: float,
                 sizes: tuple[int, ...] | None = None) -> tuple[str, dict]:
    """(path, config) at one token, from the shape and the calibrated sparsity, as measured
    on an H200 (``kernels_h200_tune_s16_{bf16,fp16}.json``, benchmarks/NOTES.md, session 16):

    * N <= 2048 (k/v projections alone): masked loads, one 256-row step per program.
    * below 40 %, and for groups of large weights (gate/up) until they switch: masked loads,
      1024 columns x 8 rows, about 4 programs per SM;
    * from 40 %: masked loads, 512 columns x 8 rows, about 8 programs per SM; for weights of
      at most DEEP_MAX_WEIGHT elements 512 columns x 16 rows, about 4 programs per SM (0.3-0.5 us
      ahead on o and on the tensor-parallel o and q/k/v shards, 0.3-0.7 behind on the one-GPU
      q/k/v group: ``kernels_h200_tune_{tp2,r16}_s17.json``);
    * from 60 % (weights of WIDE_MIN_WEIGHT elements or more) or 70 % (smaller ones): compacted
      rows, 1024 columns x 8 rows, about 3 programs per SM.

    The wide ones load straight into registers one step ahead (ROW_SUM): Triton's
    pipelined tiles, through shared memory, spent 7-8 instructions per weight element and
    were bound by issuing them (ncu, session 16).  Split-K partial sums meet by float32
    atomics into the workspace (REDUCE 2; the summation order varies from run to run), or,
    under ``torch.use_deterministic_algorithms(True)``, in a fixed order by the last
    program's ticket (REDUCE 1).  ``sizes``: the output widths of a group's linears (q/k/v,
    gate/up), None for one linear.
    """
    sizes = sizes or (N,)
    large = K * N >= WIDE_MIN_WEIGHT
    reduce = _split_k_reduce()
    s = sparsity_hint
    if N <= 2048:
        return "gemv_masked", dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=triton.cdiv(K, 256), STAGES=1, REDUCE=reduce,
                                   num_warps=4)
    if s >= (0.6 if large else 0.7):
        return _wide_config("gemv", K, sizes, sms, 1024, 8, 3, reduce)
    if s < 0.4 or (large and len(sizes) > 1):
        return _wide_config("gemv_masked", K, sizes, sms, 1024, 8, 4, reduce)
    if K * N <= DEEP_MAX_WEIGHT:
        return _wide_config("gemv_masked", K, sizes, sms, 512, 16, 4, reduce)
    return _wide_config("gemv_masked", K, sizes, sms, 512, 8, 8, reduce)


def _pair_choice(N: int, K: int, sms: int, sizes: tuple[int, ...] | None = None) -> tuple[str, dict] | None:
    """(path, config) at two tokens (two sequences decoding together), as measured on an H200
    (``kernels_h200_batch_bfloat16*.json``, session 18): the masked kernel with both tokens in
    each program (TOKENS 2), which reads a weight row once when either token keeps it, in
    512-column x 8-row tiles, about 8 programs per SM, or 4 for groups of large weights
    (gate/up); None (x * mask, then cuBLAS) for outputs of at most 2048 columns, where
    cuBLAS stayed ahead (k or v alone: 10.1 against 10.9 us at 50 and 65 %).  One rule for
    every sparsity: at 50-65 % the two masks' union still reads 58-75 % of the rows."""
    sizes = sizes or (N,)
    if N <= 2048:
        return None
    reduce = _split_k_reduce()
    per_sm = 4 if len(sizes) > 1 and K * N >= WIDE_MIN_WEIGHT else 8
    path, tiles = _wide_config("gemv_masked", K, sizes, sms, 512, 8, per_sm, reduce)
    return path, {**tiles, "TOKENS": 2}


def _traced(x: Tensor) -> bool:
    """True while torch.compile traces the op's body (Inductor decomposes a triton_op)."""
    return torch.compiler.is_compiling() or isinstance(x, (FakeTensor, FunctionalTensor))


def _torch_mask(x: Tensor, score: Tensor, threshold: float, k: int | None = None) -> Tensor:
    """x * keep mask (threshold, or top-k when k is given) in torch ops, used while
    torch.compile traces the op: Inductor fuses the threshold mask into the kernel that
    produces x, so the batched path costs what the dense matmul costs, and lays out
    every buffer itself.  Eagerly _prep's one kernel is cheaper.  (Traced, _prep's top-k
    gave wrong, run-to-run different results under Inductor on CUDA, torch 2.11.)"""
    keep = reference.threshold_mask(x, score, threshold) if k is None else reference.topk_mask(x, score, k)
    return reference.zero_dropped(x, keep)


def _prep(x: Tensor, score: Tensor, threshold: float, k: int | None, cnt: Tensor | None = None):
    """x * mask by _prep_kernel (threshold, or exact top-k when k is given); zeroes ``cnt``
    (the split-K tickets of the kernel launched next) when given."""
    M, K = x.shape
    xm = _empty((M, K), x.dtype, x.device)
    n_cnt = 0 if cnt is None else cnt.numel()
    if cnt is None:
        # never written (n_cnt = 0), but its own buffer: under Inductor, two mutable
        # arguments aliasing one tensor are cloned apart and written back in turn, so an
        # alias of xm would overwrite the masked x with the untouched clone
        cnt = _empty((1,), torch.int32, x.device)
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
    return xm


def workspace_size(n_out: int, max_tokens: int = GEMV_MAX_M) -> int:
    """int32 elements of a workspace serving every sparse linear with at most n_out outputs
    at up to max_tokens tokens: split-K tickets (one per output tile; tiles have >= 16
    columns, and each of a group's <= 3 linears may end in a partial one) and the float32
    accumulators of REDUCE = 2."""
    return max_tokens * (triton.cdiv(n_out, 16) + 3 + n_out)


def _launch_workspace(workspace: Tensor | None, n_cnt: int, n_acc: int, device, zeroed_by_prep: bool) -> Tensor:
    """The int32 buffer of one launch: its n_cnt split-K tickets, then (REDUCE 2) its n_acc
    float32 accumulators as bits.  A slice of ``workspace`` (int32, all zeros, kept zero
    by the kernels that use it) when given; else a freshly zeroed buffer (one memset per
    call: correct, slower), or for a top-k launch one that ``_prep_kernel`` zeroes."""
    need = max(n_cnt + n_acc, 1)
    if workspace is not None:
        if workspace.dtype != torch.int32 or workspace.numel() < need:
            raise ValueError(f"workspace must be int32 with at least {need} elements, got "
                             f"{workspace.dtype} with {workspace.numel()}")
        return workspace[:need]
    if zeroed_by_prep:
        return _empty((need,), torch.int32, device)
    return torch.zeros((need,), dtype=torch.int32, device=device)


@dataclasses.dataclass
class _Problem:
    """One call of the launchers, checked and flattened: x2 (M, K) with unit column stride,
    weight_t (K, N) with unit column stride, and the keep rule of each linear of the group
    (``sizes`` columns each, ``thresholds``; one linear unless grouped; top-k ``k``)."""

    x2: Tensor
    weight_t: Tensor
    bias: Tensor | None
    score: Tensor
    sizes: tuple[int, ...]
    thresholds: tuple[float, ...]
    k: int | None
    grouped: bool
    lead: tuple[int, ...]
    # rows routed to experts (expert_threshold_linear): each row's expert, the experts'
    # thresholds, and the element stride between experts' W^T; score is then (E, K)
    expert: Tensor | None = None
    expert_thresholds: Tensor | None = None
    expert_stride: int = 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.x2.shape[0], self.weight_t.shape[1], self.x2.shape[1]

    @property
    def ends(self) -> list[int]:  # column end of each linear of the group
        return list(itertools.accumulate(self.sizes))

    @property
    def keeps_all(self) -> bool:
        """A rule that keeps every channel (threshold -inf, as calibrated for sparsity 0, or
        k >= K): the dense linear, bit for bit what the reference computes."""
        if self.k is not None:
            return self.k >= self.x2.shape[1]
        return all(t == -math.inf for t in self.thresholds)


def _problem(x, weight_t, bias, score, threshold, k, group) -> _Problem:
    lead, K = tuple(x.shape[:-1]), x.shape[-1]
    if weight_t.dim() != 2 or weight_t.shape[0] != K:
        raise ValueError(f"weight_t must be (K, N) with K={K}, got {tuple(weight_t.shape)}")
    N = weight_t.shape[1]
    sizes, thresholds = group if group is not None else ((N,), (threshold,))
    if group is not None and (k is not None or sum(sizes) != N or not 1 <= len(sizes) <= 3
                              or len(thresholds) != len(sizes) or min(sizes) < 1):
        raise ValueError(f"a group needs 1 to 3 linears of sizes summing to N={N} (got {list(sizes)}), one "
                         f"threshold each (got {len(thresholds)}) and no k")
    if score.shape != ((K,) if group is None else (len(sizes), K)):
        raise ValueError(f"score must be {(K,) if group is None else (len(sizes), K)}, got {tuple(score.shape)}")
    if K * max(N, 1) >= 2**31:
        raise ValueError("weight_t has 2**31 elements or more: int32 offsets would overflow")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight_t.stride(1) != 1 or weight_t.stride(0) < N:
        weight_t = weight_t.contiguous()
    score = score.to(device=x.device, dtype=torch.float32).contiguous()
    return _Problem(x2, weight_t, None if bias is None else bias.contiguous(), score, tuple(sizes),
                    tuple(thresholds), None if k is None else max(0, min(int(k), K)), group is not None, lead)


def _sparse_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor,
                   threshold: float = 0.0, k: int | None = None, *, path: str | None = None,
                   config: dict | None = None, out: Tensor | None = None,
                   group: tuple[tuple[int, ...], tuple[float, ...]] | None = None,
                   sparsity_hint: float = 0.0, workspace: Tensor | None = None) -> Tensor:
    """Shared body of the launchers; ``path``/``config`` override the dispatch (tests, benchmarks).
    ``sparsity_hint``: the sparsity the rule was calibrated for (it picks the M = 1 kernel).
    ``workspace``: int32 zeros of at least ``workspace_size(N, M)`` elements, reused across
    calls (the kernels leave it zero); without it each split-K call zeroes its own.

    ``group`` = (sizes, thresholds): weight_t holds len(sizes) linears side by side, score
    is (len(sizes), K) and the threshold rule of linear g is thresholds[g]."""
    p = _problem(x, weight_t, bias, score, threshold, k, group)
    M, N, K = p.shape
    if out is None:
        out = _empty((M, N), x.dtype, x.device)
    if M == 0 or N == 0:
        return out.reshape(*p.lead, N)
    if K == 0:
        out.zero_() if p.bias is None else out.copy_(p.bias.expand(M, N))
        return out.reshape(*p.lead, N)
    sms = _num_sms(x.device)
    if path is None and not p.keeps_all and M <= GEMV_MAX_M:
        hint = 1 - p.k / K if p.k is not None else sparsity_hint
        choice = _gemv_choice(N, K, sms, hint, p.sizes) if M == 1 else _pair_choice(N, K, sms, p.sizes)
        if choice is not None:
            path, tiles = choice
            config = {**tiles, **(config or {})}
    path = path or ("dense" if p.keeps_all or M > SPARSE_MAX_M else "gemm")
    if path == "dense":
        return _dense(p, out).reshape(*p.lead, N)
    if path not in _CONFIGS:
        raise ValueError(f"unknown path {path!r}; choose from {', '.join(_CONFIGS)}, dense")
    if p.grouped and path == "gemm":
        raise ValueError("a group of linears runs on path 'gemv_masked', 'gemv', 'gemv_union' or 'dense', not 'gemm'")
    if path == "gemv_union" and M > UNION_MAX_M:
        raise ValueError(f"path 'gemv_union' takes at most {UNION_MAX_M} tokens (one program holds them all), got {M}")
    _kernel(p, path, {**_CONFIGS[path](M, N, K, x.dtype, sms), **(config or {})}, out, workspace)
    return out.reshape(*p.lead, N)


def _dense(p: _Problem, out: Tensor) -> Tensor:
    """x * mask, then cuBLAS (one masked copy of x per linear of a group)."""
    x2 = p.x2
    if p.keeps_all:
        xms = [x2]
    elif p.grouped:
        mask = _torch_mask if _traced(x2) else lambda x, s, t: _prep(x, s, t, None)
        xms = [mask(x2, p.score[g], t) for g, t in enumerate(p.thresholds)]
    elif _traced(x2):
        xms = [_torch_mask(x2, p.score, p.thresholds[0], p.k)]
    else:
        xms = [_prep(x2, p.score, p.thresholds[0], p.k)]
    if len(xms) > 1:
        parts = [xm @ p.weight_t[:, end - size:end] for xm, end, size in zip(xms, p.ends, p.sizes)]
        y = torch.cat(parts, dim=1)
        return y if p.bias is None else y + p.bias
    if p.bias is not None:
        return torch.addmm(p.bias, xms[0], p.weight_t, out=out)
    return torch.mm(xms[0], p.weight_t, out=out)


def k_ranges(path: str, K: int, cfg: dict) -> tuple[int, int]:
    """(channels per program, split) of a GEMV launch asking for cfg["SPLIT_K"] splits of K.

    Each program's K range is a multiple of 16 channels (of BLOCK_K for the masked kernel's
    larger steps), so that Triton specializes K_PER_SPLIT as divisible by 16 and loads x and
    the scores in 16-byte vectors: with 8-row steps and an odd number of them the masked
    kernel took 1.3-1.8x longer (H200, session 12); the split is then what it takes to cover
    K, so that no program is left without rows."""
    step = max(cfg["BLOCK_K"], 16) if path == "gemv_masked" else 16
    k_per = triton.cdiv(triton.cdiv(K, cfg["SPLIT_K"]), step) * step
    return k_per, triton.cdiv(K, k_per)


def _kernel(p: _Problem, path: str, cfg: dict, out: Tensor, workspace: Tensor | None) -> None:
    """One launch of the GEMV (``gemv``, ``gemv_masked``, ``gemv_union``) or masked GEMM (``gemm``) kernel into
    ``out``, its split-K partial sums met as ``cfg["REDUCE"]`` says (0: a second launch)."""
    (M, N, K), x2, device = p.shape, p.x2, p.x2.device
    split = cfg["SPLIT_K"]
    if path == "gemm":
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(M, cfg["BLOCK_M"]), split)
        n_tiles = grid[0] * grid[1]
    else:  # the GEMVs: one token a program, or (gemv_union) every token in each program
        if path == "gemv_union" and M > cfg["BLOCK_M"]:
            raise ValueError(f"path 'gemv_union' with BLOCK_M={cfg['BLOCK_M']} takes at most that many tokens, got {M}")
        k_per, split = k_ranges(path, K, cfg)
        cfg = {**cfg, "SPLIT_K": split}
        tiles = sum(triton.cdiv(size, cfg["BLOCK_N"]) for size in p.sizes)
        rows = triton.cdiv(M, cfg.get("TOKENS", 1))  # program rows: one token each, or a pair (TOKENS 2)
        grid = (tiles, split) if path == "gemv_union" else (tiles, split, rows)
        n_tiles = tiles if path == "gemv_union" else tiles * rows
    reduce = cfg["REDUCE"] if split > 1 else 0
    n_cnt = n_tiles if reduce else 0  # one split-K ticket per output tile
    prep_zeroes = p.k is not None and not _traced(x2)  # the top-k prep kernel runs and can zero the tickets
    cnt = _launch_workspace(workspace, n_cnt, M * N if reduce == 2 else 0, device, zeroed_by_prep=prep_zeroes)
    threshold = p.thresholds[0]
    if p.k is None:  # threshold: the kernel applies the rule
        a, mode = x2, kern.KEEP_THRESHOLD
    else:  # top-k: x * mask first (exact k; the prep also zeroes the tickets when it owns them)
        if _traced(x2):
            a = _torch_mask(x2, p.score, threshold, p.k)
        else:
            a = _prep(x2, p.score, threshold, p.k, cnt=cnt if workspace is None else None)
        mode = kern.KEEP_NONZERO
    part = _empty((split, M, N) if split > 1 and reduce != 2 else (1,), torch.float32, device)
    has_bias = p.bias is not None
    args = [a, p.weight_t, p.bias if has_bias else out, p.score, out, part, cnt]
    strides = [M, N, K, a.stride(0), p.weight_t.stride(0), out.stride(0), float(threshold)]
    if path == "gemm":
        _launch(kern._gemm_masked_kernel, grid, *args, *strides, MODE=mode, HAS_BIAS=has_bias,
                IEEE=x2.dtype == torch.float32, **{**cfg, "REDUCE": reduce})
    elif path == "gemv_union":
        cfg = {"BLOCK_KS": max(256, min(triton.next_power_of_2(k_per), 4096)), "ROW_SUM": False, **cfg}
        args.append(_empty((split * grid[0] * k_per,), torch.int32, device))  # kept-id scratch
        _launch(kern._gemv_union_kernel, grid, *args, *strides, k_per, MODE=mode, HAS_BIAS=has_bias,
                IEEE=x2.dtype == torch.float32, **_segments(p.ends, p.thresholds), **{**cfg, "REDUCE": reduce})
    else:
        if path == "gemv":
            cfg = {"BLOCK_KS": max(256, min(triton.next_power_of_2(k_per), 4096)), **cfg}
            args.append(_empty((M * split * grid[0] * k_per,), torch.int32, device))  # kept-id scratch
        kernel = kern._gemv_kernel if path == "gemv" else kern._gemv_masked_kernel
        # every argument explicit: torch's mutation analysis of a user kernel fails on a defaulted
        # one, and Inductor then clones every tensor argument (the weight too) around each launch
        cfg = {"ROW_SUM": False, "UNPACK": False, **({"TOKENS": 1} if path == "gemv_masked" else {}), **cfg}
        if cfg.get("TOKENS", 1) != 1 and (path != "gemv_masked" or cfg["TOKENS"] != 2 or not cfg["ROW_SUM"]
                                          or p.expert is not None):
            raise ValueError("TOKENS=2 (two tokens a program) runs on path 'gemv_masked' with ROW_SUM tiles and "
                             f"no experts; got path {path!r}, TOKENS={cfg['TOKENS']}, ROW_SUM={cfg['ROW_SUM']}")
        cfg["UNPACK"] = cfg["UNPACK"] and _pairs_fit(p)
        experts = dict(expert_ptr=out, thr_ptr=out, stride_we=0, EXPERTS=False)
        if p.expert is not None:
            experts = dict(expert_ptr=p.expert, thr_ptr=p.expert_thresholds, stride_we=p.expert_stride, EXPERTS=True)
        _launch(kernel, grid, *args, *strides, k_per, MODE=mode, HAS_BIAS=has_bias,
                **_segments(p.ends, p.thresholds), **experts, PDL=hopper(device),
                **{**cfg, "REDUCE": reduce})
    if split > 1 and reduce == 0:  # partials only: sum them in a second launch
        _launch(kern._splitk_reduce_kernel, (triton.cdiv(N, 256), M), part, p.bias if has_bias else out, out,
                M, N, out.stride(0), SPLIT_K=split, SPLIT_P2=triton.next_power_of_2(split),
                HAS_BIAS=has_bias, BLOCK_N=256, num_warps=4)


def _pairs_fit(p: _Problem) -> bool:
    """The GEMVs can read a bf16 weight as int32 pairs of adjacent columns (UNPACK): every
    linear of the group, the row stride, the expert stride and the view's offset into its
    storage an even number of elements (so each pair is 4-byte aligned; a storage's base is)."""
    return (p.weight_t.dtype == torch.bfloat16 and p.weight_t.stride(0) % 2 == 0 and p.expert_stride % 2 == 0
            and p.weight_t.storage_offset() % 2 == 0 and all(end % 2 == 0 for end in p.ends))


def _segments(ends: list[int], thresholds) -> dict:
    """The group arguments of the GEMV kernels: column ends and thresholds of linears 1 and 2."""
    more = [float(t) for t in thresholds[1:]] + [0.0, 0.0]
    end0, end1 = (ends + [ends[-1]])[:2]
    return dict(END0=end0, END1=end1, THRESHOLD1=more[0], THRESHOLD2=more[1], GROUPS=len(ends),
                ENDS_ALIGNED=end0 % 16 == 0 and end1 % 16 == 0)


def threshold_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor,
                     threshold: float, sparsity_hint: float = 0.0, workspace: Tensor | None = None) -> Tensor:
    """y = (x * m) @ weight_t + bias with m_i = |x_i| * score_i > threshold, decided in-kernel.

    x (M, K) fp16/bf16/fp32; weight_t (K, N) contiguous; bias (N,) or None; score (K,)
    float32.  Returns (M, N) in x's dtype; accumulation in float32.  ``sparsity_hint``:
    the share of channels the threshold was calibrated to drop; it only picks the kernel.
    ``workspace``: see ``_sparse_linear``.
    """
    return _sparse_linear(x, weight_t, bias, score, threshold=threshold, sparsity_hint=sparsity_hint,
                          workspace=workspace)


def topk_linear(x: Tensor, weight_t: Tensor, bias: Tensor | None, score: Tensor, k: int,
                workspace: Tensor | None = None) -> Tensor:
    """y = (x * m) @ weight_t + bias, m keeping per token exactly k channels of largest |x_i| * score_i.

    The k-th largest importance is found in-kernel by bisection on its float bits (no
    sort); among channels tied at it, the lowest indices are kept, so exactly
    min(max(k, 0), K) channels are kept per token.
    """
    return _sparse_linear(x, weight_t, bias, score, k=k, workspace=workspace)


def expert_threshold_linear(x: Tensor, expert: Tensor, weight_t: Tensor, scores: Tensor, thresholds: Tensor,
                            sparsity_hint: float = 0.0, workspace: Tensor | None = None, *,
                            path: str | None = None, config: dict | None = None) -> Tensor:
    """Rows of a mixture-of-experts op, each through the threshold linear of its expert, in
    one launch: y[s] = (x[s] * m_s) @ weight_t[e] with e = expert[s] and m_s keeping the
    channels with |x[s, i]| * scores[e, i] > thresholds[e], as
    ``reference.expert_threshold_linear``.

    x (S, K); expert (S,) integer ids in [0, E); weight_t (E, K, N) with unit column stride
    (each expert's W^T, rows contiguous); scores (E, K) float32; thresholds (E,) float32.
    The GEMV kernels run one program column per row (meant for decode: S = tokens x
    top-k); ``path``/``config`` override the dispatch (tests, benchmarks).
    """
    S, K = x.shape
    if weight_t.dim() != 3 or weight_t.shape[1] != K or weight_t.stride(2) != 1:
        raise ValueError(f"weight_t must be (E, K={K}, N) with unit column stride, got {tuple(weight_t.shape)} "
                         f"strides {weight_t.stride()}")
    E, _, N = weight_t.shape
    if scores.shape != (E, K) or thresholds.shape != (E,) or expert.shape != (S,):
        raise ValueError(f"scores must be {(E, K)}, thresholds {(E,)} and expert {(S,)}; got "
                         f"{tuple(scores.shape)}, {tuple(thresholds.shape)}, {tuple(expert.shape)}")
    if K * N >= 2**31:
        raise ValueError("an expert's weight has 2**31 elements or more: int32 offsets would overflow")
    out = _empty((S, N), x.dtype, x.device)
    if S == 0 or N == 0:
        return out
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    p = _Problem(x2, weight_t[0], None, scores.to(torch.float32).contiguous(), (N,), (0.0,), None, False, (S,),
                 expert=expert.contiguous(), expert_thresholds=thresholds.to(torch.float32).contiguous(),
                 expert_stride=weight_t.stride(0))
    sms = _num_sms(x.device)
    if path is None:
        path, tiles = _gemv_choice(N, K, sms, sparsity_hint)
        config = {**tiles, **(config or {})}
    if path not in ("gemv", "gemv_masked"):
        raise ValueError(f"expert rows run on path 'gemv' or 'gemv_masked', not {path!r}")
    _kernel(p, path, {**_CONFIGS[path](1, N, K, x.dtype, sms), **(config or {})}, out, workspace)
    return out


def threshold_linear_group(x: Tensor, weight_t: Tensor, bias: Tensor | None, scores: Tensor,
                           thresholds: list[float], sizes: list[int], sparsity_hint: float = 0.0,
                           workspace: Tensor | None = None) -> Tensor:
    """Up to 3 threshold linears sharing the input x, in one launch at M = 1.

    weight_t (K, sum(sizes)) holds their transposed weights side by side, bias their
    biases (or None), scores (G, K) their score rows; linear g keeps the channels with
    |x_i| * scores[g, i] > thresholds[g].  Returns (M, sum(sizes)): their outputs side
    by side, as ``reference.threshold_linear_group``.  ``sparsity_hint``: the lowest
    calibrated sparsity among them (it only picks the kernel).
    """
    if len(sizes) == 1:
        return _sparse_linear(x, weight_t, bias, scores[0], threshold=thresholds[0], sparsity_hint=sparsity_hint,
                              workspace=workspace)
    return _sparse_linear(x, weight_t, bias, scores, group=(tuple(sizes), tuple(thresholds)),
                          sparsity_hint=sparsity_hint, workspace=workspace)
