"""Triton sparse-linear launchers against kernels/reference.py.

Without CUDA the kernels run in Triton's interpreter on the CPU, on small ragged shapes.
TRITON_INTERPRET=1 is set here before triton is imported.  Triton decorates its own
library functions (tl.cumsum, ...) when first imported, so if an earlier test module
already imported it (torch.compile does), the CPU checks run instead in a fresh process
with the variable set (test_cpu_checks_in_fresh_process).  With CUDA the same checks run
compiled, plus large-shape, CUDA-graph and torch.compile checks.  Every buffer the
launchers allocate is poisoned (NaN / garbage ints), so an unwritten element fails.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language.standard as tl_standard  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

try:  # installed package, else the source tree
    from wina_fx.kernels import reference, sparse_linear as sl, sparse_linear_kernels as kern
except ImportError:
    from kernels import reference, sparse_linear as sl, sparse_linear_kernels as kern


def _patch_triton_interpreter() -> None:
    """Work around two bugs of Triton 3.6's interpreter (TRITON_INTERPRET=1, CPU tests only).

    1. It keeps scalars as 1-element arrays and converts them with ``int(array)``, which
       NumPy 2.4 refuses for arrays with a dimension, so ``for i in range(start, end)``
       fails with "only 0-dimensional arrays can be converted to Python scalars".
    2. It stores bfloat16 as uint16 and ``tl.dot`` multiplies those integers.
    Only interpreter-mode tests need it (the library runs Triton compiled, on CUDA, and the
    torch reference elsewhere); compiled kernels are untouched.
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


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and isinstance(tl_standard.cumsum, InterpretedFunction)
if INTERPRET:
    if not isinstance(kern._prep_kernel, InterpretedFunction):
        importlib.reload(kern)  # imported before the variable was set: decorate again
    _patch_triton_interpreter()
RUN_HERE = INTERPRET or HAS_CUDA
RERUN = not RUN_HERE and os.environ.get("WINA_KERNEL_TESTS_CHILD") != "1"
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"


def test_cpu_checks_in_fresh_process():
    """Triton was imported in interpret-less mode by an earlier test: rerun this file fresh."""
    if not RERUN:
        pytest.skip("the checks run in this process")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", WINA_KERNEL_TESTS_CHILD="1")
    r = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider"],
                       cwd=root, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-6000:] + r.stderr[-2000:]
    print(r.stdout.strip().splitlines()[-1])  # the child's summary, shown with -rP


TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison(monkeypatch, request):
    """Launcher buffers start as NaN (floats) or 0x7F7F7F7F (ints), never as zeros."""
    if not RUN_HERE and request.node.name != "test_cpu_checks_in_fresh_process":
        if os.environ.get("WINA_KERNEL_TESTS_CHILD") == "1":
            pytest.fail("TRITON_INTERPRET=1 did not take effect in the fresh process")
        pytest.skip("no CUDA and Triton's interpreter is not active in this process (rerun in a fresh one)")

    def poisoned(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, 0x7F7F7F7F, dtype=dtype, device=device)

    monkeypatch.setattr(sl, "_empty", poisoned)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "non-finite output (unwritten element or NaN)"
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def make(M, K, N, dtype, device=DEVICE, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    score = w.float().norm(dim=0)  # WINA: column norms
    to = lambda t: None if t is None else t.to(device)
    return to(x), to(w), to(b), to(score)


def threshold_for(x, score, sparsity):
    """A threshold dropping about `sparsity` of all channels; -1 keeps all, inf drops all."""
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return float("inf")
    return reference.importance(x, score).flatten().quantile(sparsity).item()


def ref_threshold(x, w, b, score, thr):
    mask = reference.threshold_mask(x, score, thr)
    return reference.masked_linear(x.double(), w.double(), None if b is None else b.double(), mask)


def ref_topk_stable(x, w, b, score, k):
    """Exact top-k with ties broken toward the lowest channel index (the kernels' rule)."""
    imp = reference.importance(x, score)
    k = max(0, min(k, x.shape[-1]))
    order = torch.sort(imp, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(imp, dtype=torch.bool).scatter_(-1, order, True)
    return reference.masked_linear(x.double(), w.double(), None if b is None else b.double(), mask), mask


def run(x, w, b, score, *, thr=None, k=None, path=None, config=None):
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    res = sl._sparse_linear(x, w.t().contiguous(), b, score, threshold=0.0 if thr is None else thr, k=k,
                            path=path, config=config, out=out)
    assert res.data_ptr() == out.data_ptr()
    return res


# (M, K, N): every K in {1, 17, 100, 257}, N in {1, 33, 130}, M in {1, 3, 16, 70} appears.
SHAPES = [(1, 100, 33), (1, 257, 130), (1, 17, 1), (3, 257, 33), (3, 1, 130), (16, 100, 130),
          (16, 17, 33), (70, 257, 130), (70, 1, 1)]
UNION_ROW_SUM = dict(BLOCK_M=4, BLOCK_N=64, BLOCK_R=8, SPLIT_K=3, STAGES=2, ROW_SUM=True, num_warps=1)
PATHS = {1: ["gemv", "gemv_masked", "gemm", "gemv_union", "dense"], 3: ["gemv", "gemv_masked", "gemm", "gemv_union"],
         16: ["gemm", "gemv_union"]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_threshold_linear(M, K, N, dtype):
    x, w, b, score = make(M, K, N, dtype, seed=M * 1000 + K + N)
    for sparsity in [0.0, 0.5, 0.97, 1.0]:
        thr = threshold_for(x, score, sparsity)
        ref = ref_threshold(x, w, b, score, thr)
        out = sl.threshold_linear(x, w.t().contiguous(), b, score, thr)
        assert out.shape == (M, N) and out.dtype == dtype
        assert rel_err(out, ref) < TOL[dtype], (sparsity, rel_err(out, ref))
        for path in PATHS.get(M, []):
            assert rel_err(run(x, w, b, score, thr=thr, path=path), ref) < TOL[dtype], (path, sparsity)
        if M <= 4:  # the union's tiles without tensor cores, every token's x in registers
            out = run(x, w, b, score, thr=thr, path="gemv_union", config=UNION_ROW_SUM)
            assert rel_err(out, ref) < TOL[dtype], ("gemv_union ROW_SUM", sparsity)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_topk_linear(M, K, N, dtype):
    x, w, b, score = make(M, K, N, dtype, bias=False, seed=M + K * 7 + N)
    # the interpreter runs the 32-step bisection per token slowly: fewer k at larger M
    ks = {0, 1, K // 3, K - 1, K, K + 5} if M <= 3 else {K // 3, K} if M <= 16 else {K // 3}
    for k in sorted(ks):
        ref = reference.topk_linear(x.double(), w.double(), None, score, k)
        out = sl.topk_linear(x, w.t().contiguous(), None, score, k)
        assert rel_err(out, ref) < TOL[dtype], (k, rel_err(out, ref))
        for path in PATHS.get(M, []):
            assert rel_err(run(x, w, None, score, k=k, path=path), ref) < TOL[dtype], (path, k)


@pytest.mark.parametrize("path", ["gemv", "gemv_masked", "gemm", "dense"])
def test_topk_keeps_exactly_k_with_ties(path):
    """Importance with many ties: exactly k kept per token, ties to the lowest index."""
    M, K, N = 3, 100, 33
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(1, 3, (M, K), generator=g) * (torch.randint(0, 2, (M, K), generator=g) * 2 - 1)).float()
    x, w = x.to(DEVICE), torch.randn(N, K, generator=g).to(DEVICE)
    score = torch.ones(K, device=DEVICE)
    for k in [0, 1, 7, 50, 99, 100]:
        ref, mask = ref_topk_stable(x, w, None, score, k)
        assert rel_err(run(x, w, None, score, k=k, path=path), ref) < TOL[torch.float32], k
        xm = sl._prep(x, score, 0.0, k)
        assert torch.equal(xm, x * mask), k  # x has no zeros: xm != 0 is the mask


def test_torch_mask_matches_prep():
    """The mask in torch ops (used when Inductor traces the op) == _prep's, threshold and top-k."""
    x, _, _, score = make(5, 300, 1, torch.bfloat16)
    for thr in [-1.0, 0.3, 1.5, float("inf")]:
        assert torch.equal(sl._torch_mask(x, score, thr), sl._prep(x, score, thr, None))
    x = torch.randn(5, 300, device=DEVICE)  # float32: no ties at the k-th importance
    for k in [0, 1, 150, 299, 300]:
        assert torch.equal(sl._torch_mask(x, score, 0.0, k), sl._prep(x, score, 0.0, k)), k


def test_prep_threshold_masks_x():
    M, K = 4, 2100  # several chunks per row
    x, _, _, score = make(M, K, 1, torch.float16)
    for thr in [-1.0, 0.3, 1.5, float("inf")]:
        cnt = torch.full((300,), 7, dtype=torch.int32, device=DEVICE)
        xm = sl._prep(x, score, thr, None, cnt=cnt)
        assert torch.equal(xm, x * reference.threshold_mask(x, score, thr))
        assert (cnt == 0).all()  # the split-K tickets of the next kernel


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_split_k_fixup_with_empty_splits(dtype):
    """Many splits, some with no kept rows at all: the last ticket still writes every column.
    Also a multi-chunk prologue in the GEMV."""
    M, K, N = 2, 257, 130
    x, w, b, score = make(M, K, N, dtype)
    cfgs = [("gemv", dict(BLOCK_N=32, BLOCK_R=16, SPLIT_K=7, STAGES=1, num_warps=4)),
            ("gemv", dict(BLOCK_N=64, BLOCK_R=32, SPLIT_K=2, STAGES=2, BLOCK_KS=16, num_warps=4)),
            ("gemv", dict(BLOCK_N=32, BLOCK_R=16, SPLIT_K=5, STAGES=1, REDUCE=0, num_warps=4)),
            ("gemv_masked", dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=7, STAGES=1, num_warps=4)),  # launched as 6 of 48
            ("gemv_masked", dict(BLOCK_N=64, BLOCK_K=32, SPLIT_K=3, STAGES=2, REDUCE=0, num_warps=4)),
            ("gemv_masked", dict(BLOCK_N=64, BLOCK_K=512, SPLIT_K=1, STAGES=1, num_warps=4)),
            ("gemm", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=4, num_warps=4, num_stages=2)),  # 4th split empty
            ("gemm", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, SPLIT_K=3, REDUCE=0, num_warps=4, num_stages=2)),
            ("gemv_union", dict(BLOCK_M=16, BLOCK_N=32, BLOCK_R=16, SPLIT_K=7, STAGES=1, num_warps=4)),
            ("gemv_union", dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=32, SPLIT_K=2, STAGES=2, BLOCK_KS=16, num_warps=4)),
            # wide, short tiles summed in the thread, the last column tile mostly past N
            ("gemv_masked", dict(BLOCK_N=256, BLOCK_K=8, SPLIT_K=9, STAGES=2, ROW_SUM=True, num_warps=1)),
            ("gemv", dict(BLOCK_N=256, BLOCK_R=8, SPLIT_K=9, STAGES=2, ROW_SUM=True, num_warps=1)),
            ("gemv_union", dict(BLOCK_M=2, BLOCK_N=256, BLOCK_R=8, SPLIT_K=9, STAGES=2, ROW_SUM=True, num_warps=1))]
    cfgs += [(path, dict(cfg, REDUCE=reduce)) for path, cfg in cfgs[:6] + cfgs[8:] for reduce in (1, 2)]
    for sparsity in [0.0, 0.995]:
        thr = threshold_for(x, score, sparsity)
        ref = ref_threshold(x, w, b, score, thr)
        for path, cfg in cfgs:
            assert rel_err(run(x, w, b, score, thr=thr, path=path, config=cfg), ref) < TOL[dtype], (path, sparsity)


def prefetched(path, block_n, split, reduce=2, rows=8):
    """The dispatched one-token tiles (rows summed in the thread, loads prefetched into
    registers; UNPACK where the launcher finds the weight fits), scaled down."""
    return path, {"BLOCK_N": block_n, "BLOCK_K" if path == "gemv_masked" else "BLOCK_R": rows, "SPLIT_K": split,
                  "STAGES": 1, "REDUCE": reduce, "ROW_SUM": True, "UNPACK": True, "num_warps": 1}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefetched_wide_tiles(dtype):
    """The wide tiles (ROW_SUM: loads prefetched into registers) of both one-token GEMVs, with
    bf16 weights read as int32 pairs (UNPACK) where every column end and the row stride are
    even: ragged K and N, odd ends (UNPACK then off), groups, a weight read through a wider
    row stride, one step per program, splits with no rows left, each split-K reduction,
    sparsity 0 to 100 %, and a NaN in a dropped channel, which is never read."""
    cfgs = [prefetched(path, block_n, split, reduce) for path in ("gemv_masked", "gemv")
            for block_n, split, reduce in ((64, 1, 2), (32, 9, 2), (64, 3, 1))]
    for M, K, sizes, pad in [(1, 257, (130,), 0), (1, 64, (64, 16, 50), 0),
                             (1, 257, (33, 17, 40), 0), (1, 100, (70,), 6), (1, 100, (70,), 5), (2, 17, (96,), 0)]:
        x, w, b, scores = make_group(M, K, sizes, dtype, seed=K + sum(sizes) + pad)
        wt = torch.cat([w.t(), torch.zeros(K, pad, dtype=dtype)], 1)[:, :sum(sizes)] if pad else w.t().contiguous()
        for sparsity in (0.0, 0.6, 1.0):
            thr = group_thresholds(x, scores, [sparsity] * len(sizes))
            ref = ref_group(x, w, b, scores, thr, sizes)
            group = (sizes, tuple(thr)) if len(sizes) > 1 else None
            for path, cfg in cfgs:
                out = sl._sparse_linear(x, wt, b, scores if group else scores[0], thr[0], path=path, config=cfg,
                                        group=group)
                assert rel_err(out, ref) < TOL[dtype], (sizes, pad, sparsity, path, cfg)
    x, w, b, scores = make_group(1, 100, (64,), dtype, seed=1)
    thr = threshold_for(x, scores[0], 0.5)
    dropped = int((reference.importance(x, scores[0]) <= thr).nonzero()[0, 1])
    clean = x.clone()
    x[0, dropped] = float("nan")  # |NaN| * score > thr is false: dropped
    for path, cfg in cfgs:
        out = sl._sparse_linear(x, w.t().contiguous(), b, scores[0], thr, path=path, config=cfg)
        assert rel_err(out, ref_threshold(clean, w, b, scores[0], thr)) < TOL[dtype], (path, cfg)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_two_tokens_in_each_program(dtype):
    """TOKENS=2: one program multiplies two tokens, loading each weight row once when either
    keeps it.  Ragged K and N, groups, an odd token count (the last program's second token
    absent), each split-K reduction, sparsity 0 to 100 %; a NaN in a channel that one token
    drops and the other keeps (its row is read) stays out of the first token's output."""
    cfgs = [(path, {**cfg, "TOKENS": 2}) for path, cfg in
            (prefetched("gemv_masked", 64, 1, 2), prefetched("gemv_masked", 32, 9, 2),
             prefetched("gemv_masked", 64, 3, 1), prefetched("gemv_masked", 64, 4, 0, rows=16))]
    for M, K, sizes in [(2, 257, (130,)), (2, 64, (64, 16, 50)), (3, 100, (70,)), (5, 17, (33,))]:
        x, w, b, scores = make_group(M, K, sizes, dtype, seed=K + M)
        for sparsity in (0.0, 0.6, 1.0):
            thr = group_thresholds(x, scores, [sparsity] * len(sizes))
            ref = ref_group(x, w, b, scores, thr, sizes)
            group = (sizes, tuple(thr)) if len(sizes) > 1 else None
            for path, cfg in cfgs:
                out = torch.full((M, sum(sizes)), float("nan"), dtype=dtype, device=DEVICE)
                out = sl._sparse_linear(x, w.t().contiguous(), b, scores if group else scores[0], thr[0], path=path,
                                        config=cfg, group=group, out=out)
                assert rel_err(out, ref) < TOL[dtype], (M, sizes, sparsity, cfg)
    x, w, b, scores = make_group(2, 100, (64,), dtype, seed=2)
    thr = threshold_for(x, scores[0], 0.6)
    importance = reference.importance(x, scores[0])
    channel = int(torch.nonzero((importance[0] <= thr) & (importance[1] > thr))[0])
    clean = x.clone()
    x[0, channel] = float("nan")  # token 0 drops it (NaN > t is false); token 1 keeps the row
    for path, cfg in cfgs:
        out = sl._sparse_linear(x, w.t().contiguous(), b, scores[0], thr, path=path, config=cfg)
        assert rel_err(out, ref_threshold(clean, w, b, scores[0], thr)) < TOL[dtype], cfg
    with pytest.raises(ValueError, match="TOKENS=2"):
        sl._sparse_linear(x, w.t().contiguous(), b, scores[0], thr, path="gemv", config={**cfgs[0][1]})
    with pytest.raises(ValueError, match="TOKENS=2"):
        sl._sparse_linear(x, w.t().contiguous(), b, scores[0], thr, path="gemv_masked",
                          config={**cfgs[0][1], "ROW_SUM": False})


def test_dispatch_at_two_tokens(monkeypatch):
    """Two tokens (two sequences decoding together) take the masked kernel with both in each
    program, 512-column x 8-row tiles at about 8 programs an SM (4 for groups of large
    weights), every sparsity; single linears, groups and top-k alike, with the reference's
    results.  Outputs of at most 2048 columns, and three tokens or more, stay x * mask and
    cuBLAS."""
    for N, K, sizes, per_sm in [(4096, 4096, None, 8), (28672, 4096, (14336, 14336), 4), (17920, 5120, None, 8),
                                (6144, 4096, (4096, 1024, 1024), 8)]:
        path, cfg = sl._pair_choice(N, K, 132, sizes)
        tiles = sum(triton.cdiv(n, 512) for n in (sizes or (N,)))
        assert path == "gemv_masked" and cfg["TOKENS"] == 2 and cfg["ROW_SUM"] and cfg["REDUCE"] == 2, N
        assert cfg["BLOCK_N"] == 512 and cfg["BLOCK_K"] == 8, N
        assert cfg["SPLIT_K"] == min(triton.cdiv(per_sm * 132, tiles), K // 16, 128), N
    assert sl._pair_choice(2048, 4096, 132) is None and sl._pair_choice(1024, 4096, 132) is None
    with deterministic():
        assert sl._pair_choice(4096, 4096, 132)[1]["REDUCE"] == 1
    launched = []
    real = sl._launch
    monkeypatch.setattr(sl, "_launch", lambda kernel, *a, **k: (launched.append((kernel, k.get("TOKENS"))),
                                                                real(kernel, *a, **k)))
    sizes, K = (1500, 700, 100), 64
    x, w, b, scores = make_group(2, K, sizes, torch.float32, seed=3)
    thr = group_thresholds(x, scores, (0.5, 0.6, 0.7))
    out = sl.threshold_linear_group(x, w.t().contiguous(), b, scores, thr, list(sizes), 0.5)
    assert rel_err(out, ref_group(x, w, b, scores, thr, sizes)) < TOL[torch.float32]
    assert launched == [(kern._gemv_masked_kernel, 2)]
    launched.clear()
    out = sl.topk_linear(x, w[:2200].t().contiguous(), None, scores[0], 20)
    assert rel_err(out, reference.topk_linear(x.double(), w[:2200].double(), None, scores[0], 20)) < 1e-5
    assert launched[-1] == (kern._gemv_masked_kernel, 2)
    for rows, n_out in [(x, 300), (torch.cat([x, x[:1]]), 2200)]:  # a narrow output; three tokens
        launched.clear()
        out = sl.threshold_linear(rows, w[:n_out].t().contiguous(), b[:n_out], scores[0], thr[0], 0.5)
        assert rel_err(out, ref_threshold(rows, w[:n_out], b[:n_out], scores[0], thr[0])) < TOL[torch.float32]
        assert all(kernel is not kern._gemv_masked_kernel for kernel, _ in launched), (len(rows), n_out)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(K=st.integers(1, 300), sizes=st.lists(st.integers(1, 160), min_size=1, max_size=3),
       dtype=st.sampled_from(DTYPES), path=st.sampled_from(["gemv_masked", "gemv"]),
       block_n=st.sampled_from([32, 64]), rows=st.sampled_from([8, 16]), split=st.integers(1, 12),
       reduce=st.sampled_from([0, 1, 2]), sparsity=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_wide_tiles_match_the_reference(K, sizes, dtype, path, block_n, rows, split, reduce, sparsity, seed):
    """Any shape, group, tile, split and sparsity: the wide tiles equal the float64 reference."""
    x, w, b, scores = make_group(1, K, tuple(sizes), dtype, seed=seed)
    thr = group_thresholds(x, scores, [sparsity] * len(sizes))
    group = (tuple(sizes), tuple(thr)) if len(sizes) > 1 else None
    _, cfg = prefetched(path, block_n, split, reduce, rows)
    out = sl._sparse_linear(x, w.t().contiguous(), b, scores if group else scores[0], thr[0], path=path, config=cfg,
                            group=group)
    assert rel_err(out, ref_group(x, w, b, scores, thr, tuple(sizes))) < TOL[dtype]


def test_unpack_fits_only_even_bf16_columns():
    """UNPACK reads a bf16 weight as int32 pairs of adjacent columns, so the launcher turns it
    on only when every linear's column end, the row stride and the view's storage offset are
    even (and never for fp16, fp32 or an odd expert stride)."""
    def fits(dtype, N, stride=None, sizes=None, expert_stride=0, offset=0):
        wt = torch.zeros(8, stride or N + offset, dtype=dtype)[:, offset:offset + N]
        p = sl._problem(torch.zeros(1, 8, dtype=dtype), wt, None,
                        torch.ones(len(sizes), 8) if sizes else torch.ones(8), 0.0, None,
                        (sizes, (0.0,) * len(sizes)) if sizes else None)
        return sl._pairs_fit(dataclasses.replace(p, expert_stride=expert_stride))

    bf16 = torch.bfloat16
    assert fits(bf16, 64) and fits(bf16, 64, stride=70) and fits(bf16, 130, sizes=(64, 16, 50))
    assert not fits(bf16, 65) and not fits(bf16, 64, stride=71) and not fits(bf16, 130, sizes=(63, 17, 50))
    assert not fits(torch.float16, 64) and not fits(torch.float32, 64) and not fits(bf16, 64, expert_stride=513)
    assert fits(bf16, 64, stride=70, offset=2) and not fits(bf16, 64, stride=70, offset=1)  # pairs 4-byte aligned


@pytest.mark.parametrize("reduce", [1, 2])
def test_workspace_is_left_zero_and_reused(reduce):
    """REDUCE 1 and 2 take tickets (and, for 2, float32 sums) from a caller's workspace and
    leave it all zeros, so one zeroed buffer serves every later call without a memset:
    calls of several shapes, groups, top-k and one-program-per-step splits in a row."""
    ws = torch.zeros(sl.workspace_size(200, 3), dtype=torch.int32, device=DEVICE)
    for i, (M, K, N, sizes) in enumerate([(1, 257, 130, None), (3, 100, 200, None), (1, 300, 90, (33, 17, 40)),
                                          (2, 64, 200, (150, 50))]):
        x, w, b, score = make(M, K, N, torch.float32, seed=20 + i)
        for split, block in [(3, 32), (triton.cdiv(K, 16), 16)]:
            cfg = dict(BLOCK_N=32, BLOCK_K=block, SPLIT_K=split, STAGES=1, REDUCE=reduce, num_warps=4)
            if sizes is None:
                thr = threshold_for(x, score, 0.6)
                out = sl._sparse_linear(x, w.t().contiguous(), b, score, thr, path="gemv_masked", config=cfg,
                                        workspace=ws)
                assert rel_err(out, ref_threshold(x, w, b, score, thr)) < 1e-5, (i, split)
                out = sl._sparse_linear(x, w.t().contiguous(), b, score, k=K // 3, path="gemv_masked", config=cfg,
                                        workspace=ws)
                ref = reference.topk_linear(x.double(), w.double(), b.double(), score, K // 3)
                assert rel_err(out, ref) < 1e-5, (i, split)
            else:
                scores = torch.rand(len(sizes), K, device=DEVICE) + 0.5
                thr = group_thresholds(x, scores, (0.5, 0.8, 0.3)[:len(sizes)])
                out = sl._sparse_linear(x, w.t().contiguous(), b, scores, path="gemv_masked", config=cfg,
                                        group=(sizes, tuple(thr)), workspace=ws)
                assert rel_err(out, ref_group(x, w, b, scores, thr, sizes)) < 1e-5, (i, split)
            assert not ws.any(), (i, split)
    with pytest.raises(ValueError, match="workspace"):
        sl._sparse_linear(x, w.t().contiguous(), b, score, 0.0, path="gemv_masked", workspace=ws[:3],
                          config=dict(SPLIT_K=4, BLOCK_K=16, REDUCE=reduce))


@pytest.mark.parametrize("path", ["gemv", "gemv_masked", "gemm", "gemv_union", "dense"])
def test_weight_rows_with_a_wider_stride(path):
    """weight_t may be a column slice of a wider (K, N') buffer (a linear stored beside its
    siblings): the kernels read it in place through its row stride."""
    M, K, N = 1, 257, 70
    x, w, b, score = make(M, K, N + 50, torch.float16, seed=4)
    wt = w.t().contiguous()[:, 20:20 + N]
    assert wt.stride(0) == N + 50
    thr = threshold_for(x, score, 0.5)
    out = sl._sparse_linear(x, wt, b[20:20 + N], score, thr, path=path)
    assert rel_err(out, ref_threshold(x, w[20:20 + N], b[20:20 + N], score, thr)) < TOL[torch.float16]


@pytest.mark.parametrize("path", [None, "gemv", "gemv_masked"])
def test_keep_all_is_dense(path):
    """threshold -inf (what calibration gives for sparsity 0) and k >= K keep every channel;
    the auto dispatch then runs the plain dense product, with the reference's NaN behaviour."""
    M, K, N = 1, 100, 33
    x, w, b, score = make(M, K, N, torch.float32, seed=3)
    ref = reference.masked_linear(x.double(), w.double(), b.double(), torch.ones_like(x, dtype=torch.bool))
    assert rel_err(run(x, w, b, score, thr=-float("inf"), path=path), ref) < 1e-5
    assert rel_err(run(x, w, b, score, k=K + 1, path=path), ref) < 1e-5
    x[0, 7] = float("nan")
    assert torch.isnan(sl.threshold_linear(x, w.t().contiguous(), b, score, -float("inf"))).all()
    assert torch.isnan(reference.threshold_linear(x, w, b, score, -float("inf"))).all()


def test_nan_input():
    """A NaN channel: the threshold rule drops it (NaN > t is false) and, unlike the
    reference's x * mask (NaN * 0 = NaN), a dropped channel is never read, so y stays
    finite.  Top-k ranks NaN first (as torch.topk does), keeps it, and y is NaN."""
    M, K, N = 1, 100, 33
    x, w, b, score = make(M, K, N, torch.float32)
    x[0, 5] = float("nan")
    out = sl.threshold_linear(x, w.t().contiguous(), b, score, 0.5)
    clean = x.nan_to_num(0.0)
    assert rel_err(out, ref_threshold(clean, w, b, score, 0.5)) < 1e-5
    out = sl.topk_linear(x, w.t().contiguous(), b, score, 10)
    assert torch.isnan(out).all()
    assert torch.isnan(reference.topk_linear(x, w, b, score, 10)).all()


def test_union_of_masks_each_token_its_own_channels():
    """gemv_union reads a row when any token keeps it, and each token multiplies only the
    channels it keeps: a NaN its own rule drops stays out of its output although another
    token's keeps the row.  At most UNION_MAX_M tokens."""
    M, K, N = 4, 100, 33
    x, w, b, score = make(M, K, N, torch.float32, seed=6)
    thr = threshold_for(x, score, 0.6)
    importance = reference.importance(x, score)
    kept_by_others = importance[1:].max(dim=0).values > thr
    channel = int(torch.nonzero(kept_by_others & (importance[0] <= thr))[0])
    x[0, channel] = float("nan")  # dropped by token 0's rule (NaN > t is false), its row still read
    ref = ref_threshold(x.nan_to_num(0.0), w, b, score, thr)
    for cfg in [None, dict(BLOCK_M=4, BLOCK_N=64, BLOCK_R=8, SPLIT_K=3, STAGES=2, ROW_SUM=True, num_warps=1)]:
        assert rel_err(run(x, w, b, score, thr=thr, path="gemv_union", config=cfg), ref) < TOL[torch.float32], cfg
    with pytest.raises(ValueError, match="BLOCK_M=2 takes at most that many tokens"):
        sl._sparse_linear(x, w.t().contiguous(), b, score, thr, path="gemv_union",
                          config=dict(BLOCK_M=2, BLOCK_N=64, BLOCK_R=8, ROW_SUM=True))
    many = torch.zeros(sl.UNION_MAX_M + 1, K)
    with pytest.raises(ValueError, match="at most 16 tokens"):
        sl._sparse_linear(many, w.t().contiguous(), b, score, thr, path="gemv_union")


def test_leading_dims_and_validation():
    x, w, b, score = make(6, 17, 33, torch.float32)
    out = sl.threshold_linear(x.view(2, 3, 17), w.t().contiguous(), b, score, 0.2)
    assert out.shape == (2, 3, 33)
    assert rel_err(out.view(6, 33), ref_threshold(x, w, b, score, 0.2)) < 1e-5
    with pytest.raises(ValueError):
        sl.threshold_linear(x, w, b, score, 0.2)  # (N, K) instead of (K, N)
    with pytest.raises(ValueError):
        sl.threshold_linear(x, w.t().contiguous(), b, score[:5], 0.2)


def make_group(M, K, sizes, dtype, device=DEVICE, bias=True, seed=0):
    """Inputs of a group of linears sharing x: the linears' weights stacked (sum(sizes), K)."""
    x, w, b, _ = make(M, K, sum(sizes), dtype, device, bias, seed)
    g = torch.Generator().manual_seed(seed + 1)
    scores = (torch.rand(len(sizes), K, generator=g) + 0.5).to(device)  # a different score row per linear
    return x, w, b, scores


def group_thresholds(x, scores, sparsities):
    return [threshold_for(x, score, s) for score, s in zip(scores, sparsities)]


def ref_group(x, w, b, scores, thresholds, sizes):
    return reference.threshold_linear_group(x.double(), w.double(), None if b is None else b.double(), scores,
                                            thresholds, sizes)


# sizes chosen so that column tiles cross the linears' boundaries (ragged, not multiples of 16)
GROUP_SIZES = [(33, 17, 40), (64, 16), (1, 130), (5, 3, 2), (50,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", GROUP_SIZES, ids=str)
@pytest.mark.parametrize("M,K", [(1, 100), (1, 257), (3, 17)])
def test_threshold_linear_group(M, K, sizes, dtype):
    """Each linear of the group keeps by its own score row and threshold; one launch at M = 1."""
    for bias in (True, False):
        x, w, b, scores = make_group(M, K, sizes, dtype, bias=bias, seed=M + K + len(sizes))
        for sparsities in [(0.5, 0.0, 0.9), (0.97, 0.3, 1.0), (0.0, 0.0, 0.0)]:
            thr = group_thresholds(x, scores, sparsities)
            ref = ref_group(x, w, b, scores, thr, sizes)
            out = sl.threshold_linear_group(x, w.t().contiguous(), b, scores, thr, list(sizes))
            assert out.shape == (M, sum(sizes)) and out.dtype == dtype
            assert rel_err(out, ref) < TOL[dtype], (sparsities, bias, rel_err(out, ref))


def test_group_split_k_and_forced_paths():
    """Split-K over tiles that straddle linears, and both paths (M = 3 through the GEMV)."""
    sizes, K = (33, 17, 40), 257
    x, w, b, scores = make_group(3, K, sizes, torch.float32, seed=5)
    thr = group_thresholds(x, scores, (0.5, 0.9, 0.2))
    ref = ref_group(x, w, b, scores, thr, sizes)
    wt = w.t().contiguous()
    for path, cfg in [("gemv_masked", dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=3, STAGES=1, num_warps=4)),
                      ("gemv", dict(BLOCK_N=16, BLOCK_R=16, SPLIT_K=3, STAGES=1, REDUCE=0, num_warps=4)),
                      ("gemv", dict(BLOCK_N=32, BLOCK_R=16, SPLIT_K=2, STAGES=2, BLOCK_KS=64, num_warps=4)),
                      ("gemv", None),
                      ("gemv_masked", dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=1, STAGES=2, num_warps=4)),
                      ("gemv_masked", dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, STAGES=1, num_warps=4)),
                      ("gemv_masked", dict(BLOCK_N=64, BLOCK_K=8, SPLIT_K=5, STAGES=2, ROW_SUM=True, num_warps=1)),
                      ("gemv", dict(BLOCK_N=64, BLOCK_R=8, SPLIT_K=5, STAGES=2, ROW_SUM=True, num_warps=1)),
                      ("gemv_union", dict(BLOCK_M=16, BLOCK_N=16, BLOCK_R=16, SPLIT_K=3, STAGES=1, num_warps=4)),
                      ("gemv_union", dict(BLOCK_M=4, BLOCK_N=32, BLOCK_R=8, SPLIT_K=3, STAGES=2, ROW_SUM=True,
                                          num_warps=1)),
                      ("gemv_union", None),
                      ("dense", None)]:
        out = sl._sparse_linear(x, wt, b, scores, path=path, config=cfg, group=(sizes, tuple(thr)))
        assert rel_err(out, ref) < TOL[torch.float32], (path, cfg)
    with pytest.raises(ValueError, match="sizes summing"):
        sl.threshold_linear_group(x, wt, b, scores, thr, [33, 17, 41])
    with pytest.raises(ValueError, match="score must be"):
        sl.threshold_linear_group(x, wt, b, scores[:2], thr, list(sizes))
    with pytest.raises(ValueError, match="a group"):
        sl._sparse_linear(x, wt, b, scores, path="gemm", group=(sizes, tuple(thr)))


@contextlib.contextmanager
def deterministic():
    """torch.use_deterministic_algorithms(True) for the block, then as it was."""
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)


def test_dispatch_at_one_token(monkeypatch):
    """_gemv_choice (the H200-measured rule, session 16): small outputs take one-step masked
    programs; every other shape wide tiles (rows summed in the thread, loads prefetched into
    registers, bf16 unpacked from int32 pairs): masked 1024-column tiles below 40 % (and for
    the gate/up group until it switches), masked 512-column tiles from 40 % (16-row steps at
    4 programs an SM for weights of at most 2**24 elements, 8-row steps at 8 an SM above),
    compacted 1024-column tiles from 60 % (large weights) or 70 % (smaller ones).  Split-K sums by
    float32 atomics, or by the last ticket in deterministic mode.  The launcher follows the
    rule for single linears, groups and top-k (whose sparsity is 1 - k / K), with the same
    results."""
    assert sl._gemv_choice(1024, 4096, 132, 0.9)[1]["REDUCE"] == 2
    for (N, K, sizes), below, above in [((17920, 5120, None), 0.5, 0.6), ((14336, 4096, None), 0.55, 0.6),
                                        ((4096, 14336, None), 0.5, 0.65), ((28672, 4096, (14336, 14336)), 0.5, 0.6),
                                        ((4096, 4096, None), 0.65, 0.7), ((6144, 4096, (4096, 1024, 1024)), 0.65, 0.8)]:
        large_group = sizes is not None and N * K >= sl.WIDE_MIN_WEIGHT
        deep = N * K <= sl.DEEP_MAX_WEIGHT
        for s, block_n, rows in [(0.25, 1024, 8), (below, 1024 if large_group else 512, 16 if deep else 8)]:
            path, cfg = sl._gemv_choice(N, K, 132, s, sizes)
            assert path == "gemv_masked" and cfg["BLOCK_N"] == block_n and cfg["BLOCK_K"] == rows, (N, K, s)
            assert cfg["REDUCE"] == 2 and cfg["ROW_SUM"] and cfg["UNPACK"] and cfg["STAGES"] == 1, (N, K, s)
            assert cfg["num_warps"] == block_n // 256, (N, K, s)
        path, cfg = sl._gemv_choice(N, K, 132, above, sizes)
        assert path == "gemv" and cfg["ROW_SUM"] and cfg["UNPACK"] and cfg["BLOCK_N"] == 1024, (N, K)
    # about 3 compacted programs per SM, the output tiles counted per linear of a group
    # (7168 = 7 tiles of 1024: 14 tiles, 29 splits); masked 512-column tiles at about 8 per SM
    # (8 tiles: 132 splits wanted, 128 at most under float32 atomics), or with 16-row steps at
    # about 4 per SM (8 tiles: 66 splits); the tensor-parallel shards of o and q/k/v take those
    assert sl._gemv_choice(14336, 4096, 132, 0.65, (7168, 7168))[1]["SPLIT_K"] == 29
    assert sl._gemv_choice(4096, 14336, 132, 0.5)[1]["SPLIT_K"] == 128
    assert sl._gemv_choice(4096, 4096, 132, 0.5)[1]["SPLIT_K"] == 66
    assert sl._gemv_choice(4096, 2048, 132, 0.5)[1]["BLOCK_K"] == 16
    assert sl._gemv_choice(3072, 4096, 132, 0.5, (2048, 512, 512))[1]["BLOCK_K"] == 16
    assert sl._gemv_choice(6144, 4096, 132, 0.5, (4096, 1024, 1024))[1]["BLOCK_K"] == 8
    with deterministic():
        assert all(sl._gemv_choice(N, 4096, 132, s)[1]["REDUCE"] == 1
                   for N in (1024, 4096, 17920) for s in (0.25, 0.5, 0.9))
        assert sl._gemv_choice(17920, 5120, 132, 0.5)[1]["SPLIT_K"] <= 32

    launched = []
    real = sl._launch
    monkeypatch.setattr(sl, "_launch", lambda kernel, *a, **k: (launched.append(kernel), real(kernel, *a, **k)))
    sizes, K = (1500, 700, 100), 64  # a small weight: compacted from 70 %
    x, w, b, scores = make_group(1, K, sizes, torch.float32, seed=9)
    thr = group_thresholds(x, scores, (0.6, 0.7, 0.8))
    ref = ref_group(x, w, b, scores, thr, sizes)
    for hint, kernel in [(0.3, kern._gemv_masked_kernel), (0.6, kern._gemv_masked_kernel), (0.8, kern._gemv_kernel)]:
        launched.clear()
        out = sl.threshold_linear_group(x, w.t().contiguous(), b, scores, thr, list(sizes), hint)
        assert rel_err(out, ref) < TOL[torch.float32] and launched == [kernel], hint
        launched.clear()
        out = sl.threshold_linear(x, w[:2200].t().contiguous(), b[:2200], scores[0], thr[0], hint)
        assert launched == [kernel], hint
        launched.clear()
        out = sl.topk_linear(x, w[:2200].t().contiguous(), b[:2200], scores[0], round((1 - hint) * K))
        assert launched[-1] is kernel, hint
    launched.clear()
    out = sl.threshold_linear(x, w[:90].t().contiguous(), b[:90], scores[0], thr[0], 0.5)
    assert rel_err(out, ref_threshold(x, w[:90], b[:90], scores[0], thr[0])) < TOL[torch.float32]
    assert launched == [kern._gemv_masked_kernel]


# ---------------------------------------------------------------- CUDA only (compiled kernels)
cuda = pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA and compiled Triton kernels")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,N", [(1, 4096, 4096), (1, 14336, 4096), (1, 5120, 17920), (2, 4096, 4096),
                                   (2, 14336, 4096), (5, 4096, 14336), (64, 4096, 4096), (300, 4096, 1000)])
def test_cuda_large(M, K, N, dtype):
    x, w, b, score = make(M, K, N, dtype, device="cuda")
    wt = w.t().contiguous()
    for sparsity in [0.0, 0.5, 0.9, 0.99]:
        thr = threshold_for(x, score, sparsity)
        ref = ref_threshold(x, w, b, score, thr)
        assert rel_err(sl.threshold_linear(x, wt, b, score, thr), ref) < TOL[dtype], sparsity
        k = round((1 - sparsity) * K)
        ref = reference.topk_linear(x.double(), w.double(), b.double(), score, k)
        assert rel_err(sl.topk_linear(x, wt, b, score, k), ref) < TOL[dtype], sparsity
        for path in (["gemv", "gemv_masked", "gemm"] if M <= 8 else ["gemm", "dense"]):
            assert rel_err(run(x, w, b, score, thr=thr, path=path), ref_threshold(x, w, b, score, thr)) < TOL[dtype]


@cuda
@pytest.mark.parametrize("offset", [1, 2])
def test_cuda_bf16_weight_views_at_any_offset(offset):
    """A bf16 W^T viewed at an odd storage offset cannot be read as 4-byte column pairs (UNPACK
    would issue misaligned loads, a fault on the GPU): the launcher reads it by element; at an
    even offset by pairs.  Both as the dispatch picks, at every one-token tile."""
    x, w, b, score = make(1, 4096, 4096, torch.bfloat16, device="cuda")
    buffer = torch.zeros(4096, 4096 + 2, dtype=torch.bfloat16, device="cuda")
    wt = buffer[:, offset:offset + 4096]
    wt.copy_(w.t())
    for sparsity in [0.3, 0.5, 0.8]:
        thr = threshold_for(x, score, sparsity)
        out = sl.threshold_linear(x, wt, b, score, thr, sparsity)
        assert rel_err(out, ref_threshold(x, w, b, score, thr)) < TOL[torch.bfloat16], (offset, sparsity)


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("M,K,sizes", [(1, 4096, (4096, 1024, 1024)), (1, 4096, (14336, 14336)),
                                       (1, 576, (576, 192, 192)), (1, 640, (1024, 256, 256)), (2, 4096, (14336, 14336)),
                                       (2, 4096, (4096, 1024, 1024)), (7, 4096, (4096, 1024))])
def test_cuda_group_large(M, K, sizes, dtype):
    x, w, b, scores = make_group(M, K, sizes, dtype, device="cuda")
    wt = w.t().contiguous()
    for sparsities in [(0.5, 0.5, 0.5), (0.25, 0.65, 0.9), (0.0, 0.0, 0.0)]:
        thr = group_thresholds(x, scores, sparsities)
        out = sl.threshold_linear_group(x, wt, b, scores, thr, list(sizes))
        assert rel_err(out, ref_group(x, w, b, scores, thr, sizes)) < TOL[dtype], sparsities


@cuda
def test_cuda_deterministic_and_graph_capture():
    x, w, b, score = make(1, 5120, 17920, torch.float16, device="cuda")
    wt = w.t().contiguous()
    thr = threshold_for(x, score, 0.5)
    with deterministic():  # split-K sums in a fixed order
        eager = sl.threshold_linear(x, wt, b, score, thr, 0.5)
        assert torch.equal(eager, sl.threshold_linear(x, wt, b, score, thr, 0.5))
    fn = lambda: (sl.threshold_linear(x, wt, b, score, thr), sl.topk_linear(x, wt, b, score, 2560))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = fn()
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    assert rel_err(outs[0], ref_threshold(x, w, b, score, thr)) < 1e-2
    ref = reference.topk_linear(x.double(), w.double(), b.double(), score, 2560)
    assert rel_err(outs[1], ref) < 1e-2


@cuda
@pytest.mark.parametrize("M", [1, 64])
def test_cuda_torch_compile_sees_kernels(M):
    x, w, b, score = make(M, 4096, 4096, torch.float16, device="cuda")
    wt = w.t().contiguous()
    fn = torch.compile(lambda x: sl.threshold_linear(x * 1.5, wt, b, score, 0.3), fullgraph=True)
    assert rel_err(fn(x), ref_threshold(x * 1.5, w, b, score, 0.3)) < 1e-2


@cuda
def test_cuda_triton_op_wrapping():
    """What the custom op will do: a triton_op around the launcher, compiled by Inductor."""
    x, w, b, score = make(1, 4096, 4096, torch.float16, device="cuda")
    wt = w.t().contiguous()

    @torch.library.triton_op("wina_kernels_test::threshold_linear", mutates_args={})
    def op(x: torch.Tensor, wt: torch.Tensor, b: torch.Tensor, score: torch.Tensor, t: float) -> torch.Tensor:
        return sl.threshold_linear(x, wt, b, score, t)

    fn = torch.compile(lambda x: op(x, wt, b, score, 0.3), fullgraph=True)
    assert rel_err(fn(x), ref_threshold(x, w, b, score, 0.3)) < 1e-2


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("E, K, N, S", [(4, 100, 33, 2), (3, 257, 130, 5), (5, 64, 300, 1)])
def test_expert_rows_match_the_reference(E, K, N, S, dtype):
    """Rows routed to experts of a 3-D weight, one launch: each row through its expert's
    threshold rule and W^T, on every GEMV path and the wide tiles (bf16 pairs where the
    strides are even), the experts' W^T read in place from a weight stored (E, N, K)
    transposed (as the backend re-lays it out) and from one with padded expert strides."""
    g = torch.Generator().manual_seed(E * K + S)
    stored = torch.randn(E, N, K, generator=g).to(dtype)
    relaid = stored.transpose(1, 2).contiguous().transpose(1, 2)  # values of stored, W_e^T rows contiguous
    padded = torch.zeros(E, K + 3, N + 5, dtype=dtype)[:, :K, :N]
    padded.copy_(stored.transpose(1, 2))
    x = torch.randn(S, K, generator=g).to(dtype)
    expert = torch.randint(0, E, (S,), generator=g)
    scores = stored.float().norm(dim=1)  # (E, K) column norms of each W_e
    thresholds = torch.stack([reference.importance(x, scores[e]).flatten().quantile(0.5) for e in range(E)])
    ref = reference.expert_threshold_linear(x.double(), expert, stored.transpose(1, 2).double(), scores, thresholds)
    configs = [(None, None), ("gemv_masked", dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=3, STAGES=1, REDUCE=1, num_warps=4)),
               ("gemv", dict(BLOCK_N=32, BLOCK_R=16, SPLIT_K=2, STAGES=1, REDUCE=1, num_warps=4)),
               ("gemv_masked", dict(BLOCK_N=64, BLOCK_K=32, SPLIT_K=2, STAGES=1, REDUCE=2, num_warps=4)),
               prefetched("gemv_masked", 64, 3), prefetched("gemv", 64, 2)]
    for weight_t in (relaid.transpose(1, 2), padded):
        weight_t = weight_t.to(DEVICE) if DEVICE == "cpu" else _on_cuda_keeping_strides(weight_t)
        for path, cfg in configs:
            out = sl.expert_threshold_linear(x.to(DEVICE), expert.to(DEVICE), weight_t, scores.to(DEVICE),
                                             thresholds.to(DEVICE), 0.5, path=path, config=cfg)
            assert rel_err(out.cpu(), ref) < TOL[dtype], (path, cfg)
    with pytest.raises(ValueError, match="unit column stride"):
        sl.expert_threshold_linear(x, expert, stored, scores, thresholds)


def _on_cuda_keeping_strides(t: torch.Tensor) -> torch.Tensor:
    """A CUDA copy of ``t`` with the same strides (``.to`` would make a padded view dense)."""
    base = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cuda")
    return base.copy_(t)
