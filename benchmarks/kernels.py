"""Latency of the wina sparse linear vs dense cuBLAS vs the bandwidth floor (GPU only).

    python benchmarks/kernels.py            # full table -> benchmarks/results/kernels_<gpu>.{json,png}
    python benchmarks/kernels.py --sweep    # also time candidate tile configs (tuning runs)
    python benchmarks/kernels.py --quick    # one shape, for a smoke test
    python benchmarks/kernels.py --groups   # one launch for q/k/v and gate/up vs one per linear
    python benchmarks/kernels.py --teal PATH  # also TEAL's kernel (batch 1, fp16), impl "teal"

Method: every implementation is captured in CUDA graphs, one per weight buffer (at least
3 buffers and 160 MB, rotated so the L2 never serves a weight byte), and timed with
triton.testing.do_bench (median).  do_bench's own L2 flush (zeroing 256 MB before each
call) is replaced by the rotation plus a ~50 us GPU sleep: the zeroing leaves ~50 MB of
dirty lines in L2 whose write-back lands inside the timed call (~16 us on every kernel
here); the sleep keeps the CPU's graph launch out of the timed interval.  The
"_flushed" records keep do_bench's default for comparison.  Inputs are random normal, never
zeros.  The threshold for a target sparsity is the quantile of |x| * score over the
whole random input (so per-token sparsity varies around it); top-k keeps round((1-s) K)
per token.  The floor is the bytes that must move (weight rows kept by at least one
token + x + output) over the device-to-device copy bandwidth measured in the same run.
Each wina output is checked against the torch reference before it is timed.  TEAL's kernel
(FasterDecoding/TEAL ``kernels/sparse_gemv.py``, given by path, never copied here) keeps
|x| > the quantile of |x|, its own rule, and is autotuned by its own autotuner before capture.
Writes to $OUT when set, else to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
import types

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this file is benchmarks/kernels.py: keep its folder off sys.path so `kernels` is the package
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.join(ROOT, "benchmarks")]
sys.path.insert(0, ROOT)
from kernels import reference, sparse_linear as sl  # noqa: E402
import wina_fx.ops  # noqa: E402,F401  (registers torch.ops.wina, whose workspace the launches share)

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096), (5120, 17920), (17920, 5120)]  # (K in, N out)
BATCHES = [1, 64, 256]
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]
DTYPES = [torch.float16, torch.bfloat16]
NBUF_MIN, ROTATE_BYTES = 3, 160e6
WARMUP_MS, REP_MS = 5, 20
SLEEP_CYCLES = 100_000  # ~50 us at 1.98 GHz
DEVICE = "cuda"


def load_teal(path: str):
    """TEAL's kernels/sparse_gemv.py as a module.  Its tail imports ``compile_wrapper`` only
    for torch.compile wrapper classes that these benchmarks do not use: a stand-in base
    class lets the file import; the Triton kernels are TEAL's, unchanged."""
    import importlib.util

    sys.modules.setdefault("compile_wrapper", types.SimpleNamespace(BaseKernel=object))
    spec = importlib.util.spec_from_file_location("teal_sparse_gemv", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def out_dir() -> str:
    d = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(d, exist_ok=True)
    return d


def gpu_tag() -> str:
    name = torch.cuda.get_device_name().lower()
    for tag in ["h200", "h100", "a100", "l40s", "b200"]:
        if tag in name:
            return tag
    return name.split()[-1].replace("/", "_")


def num_sms() -> int:
    return torch.cuda.get_device_properties(0).multi_processor_count


def device_header(bw: float) -> dict:
    return dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(), copy_bandwidth_Bps=bw, sms=num_sms(),
                method="CUDA graphs, one per weight buffer, >= 3 buffers and 160 MB rotated; do_bench median; "
                       "do_bench's 256 MB zeroing flush off except in *_flushed records",
                dispatch=dict(GEMV_MAX_M=sl.GEMV_MAX_M, SPARSE_MAX_M=sl.SPARSE_MAX_M))


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy."""
    a = torch.randn(1 << 28, device=DEVICE)
    b = torch.empty_like(a)
    with _NoFlush():
        ms = do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * a.nbytes / (ms * 1e-3)


class _NoFlush:
    """do_bench without its 256 MB zeroing flush, which leaves ~50 MB of dirty lines in L2
    whose write-back lands inside the next timed call.  In its place the GPU sleeps ~50 us
    (no memory traffic), so that the CPU has enqueued the timed graph before the GPU gets
    there; with neither, small kernels would time the CPU's launch instead of the GPU."""

    class _Busy:
        def zero_(self):
            torch.cuda._sleep(SLEEP_CYCLES)

    def __enter__(self):
        drv = triton.runtime.driver.active
        self.saved = drv.get_empty_cache_for_benchmark
        drv.get_empty_cache_for_benchmark = lambda: self._Busy()

    def __exit__(self, *exc):
        triton.runtime.driver.active.get_empty_cache_for_benchmark = self.saved


def empty_graph_us() -> float:
    """What the harness itself costs: a CUDA graph of one empty kernel, timed as every case is."""
    one = torch.zeros(1, device=DEVICE)
    return time_us([lambda: one.add_(0)])


def save_records(stem: str, header: dict, records: list) -> str:
    """``<stem>_<gpu>.json`` in out_dir(): the run's header and its records; returns the path."""
    path = os.path.join(out_dir(), f"{stem}_{gpu_tag()}.json")
    with open(path, "w") as f:
        json.dump(dict(header=header, records=records), f, indent=1)
    return path


def time_us(fns, flush=False) -> float:
    """Median latency (us) of fns (one per weight buffer), each captured in a CUDA graph."""
    graphs = []
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    for f in fns:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            f()
        graphs.append(g)
    it = itertools.cycle(graphs)
    if flush:
        us = do_bench(lambda: next(it).replay(), warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e3
    else:
        with _NoFlush():
            us = do_bench(lambda: next(it).replay(), warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e3
    del graphs
    return us


def eager_us(fns) -> float:
    it = itertools.cycle(fns)
    with _NoFlush():
        return do_bench(lambda: next(it)(), warmup=WARMUP_MS, rep=REP_MS, return_mode="median") * 1e3


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm()).item()


class Case:
    """Weights (several copies, both layouts) of one (K, N, dtype)."""

    def __init__(self, K, N, dtype):
        self.K, self.N, self.dtype = K, N, dtype
        g = torch.Generator(device=DEVICE).manual_seed(K * 7 + N)
        nbuf = min(16, max(NBUF_MIN, -(-int(ROTATE_BYTES) // (K * N * dtype.itemsize))))
        self.w = [(torch.randn(N, K, device=DEVICE, generator=g) * K**-0.5).to(dtype) for _ in range(nbuf)]
        self.wt = [w.t().contiguous() for w in self.w]
        self.score = self.w[0].float().norm(dim=0)  # WINA: column L2 norms

    def inputs(self, M, seed=0):
        g = torch.Generator(device=DEVICE).manual_seed(seed + M)
        return torch.randn(M, self.K, device=DEVICE, generator=g).to(self.dtype)

    def threshold(self, x, s):
        if s <= 0:
            return -math.inf  # what calibration gives for sparsity 0: the op runs cuBLAS
        return reference.importance(x, self.score).flatten().float().quantile(s).item()

    def floor_bytes(self, x, mask):
        rows = int(mask.any(0).sum()) if mask is not None else self.K
        item = x.element_size()
        return rows * self.N * item + x.numel() * item + x.shape[0] * self.N * item, rows / self.K


def check(case, x, mask, out):
    ref = F.linear((x * mask.to(x.dtype)).float(), case.w[0].float())
    err = rel_err(out, ref)
    if not err < 2e-2:
        raise AssertionError(f"wrong result K={case.K} N={case.N} M={x.shape[0]} {case.dtype}: rel err {err}")
    return err


def wina_fns(case, x, path=None, config=None, thr=None, k=None, hint=0.0):
    """One closure per weight buffer running the launcher as the custom op does: the
    calibrated sparsity as the dispatch hint and the shared zeroed workspace (auto
    dispatch unless path is given)."""
    ws = torch.ops.wina.workspace(torch.device(DEVICE), sl.workspace_size(case.N))
    return [lambda wt=wt: sl._sparse_linear(x, wt, None, case.score, threshold=thr or 0.0, k=k, path=path,
                                            config=config, sparsity_hint=hint, workspace=ws) for wt in case.wt]


def record(records, log, rec, impl, us, dense_us, floor_us, kept, err):
    records.append(dict(rec, impl=impl, us=us, speedup_vs_dense=dense_us / us, floor_us=floor_us,
                        rows_kept=kept, err=err))
    log(f"{rec['dtype']:8s} K={rec['K']:5d} N={rec['N']:5d} M={rec['batch']:3d} s={rec['sparsity']:.2f} {impl:22s} "
        f"{us:7.1f} us  x{dense_us / us:5.2f} vs dense {dense_us:6.1f}  floor {floor_us:6.1f} "
        f"({100 * floor_us / us:3.0f}%)  err {err:.1e}")


def teal_record(teal, case, x, s, rec, dense_us, bw, records, log):
    """TEAL's splitk_sparse_gemv at batch 1 (fp16 only: TEAL has no bf16 path), impl "teal"."""
    thr = x.abs().float().quantile(s).item() if s > 0 else -1.0
    mask = (x.abs() > thr)
    fns = [lambda wt=wt: teal.splitk_sparse_gemv(x.view(1, 1, -1), wt.t(), thr, int(s * 10)) for wt in case.wt]
    try:
        err = check(case, x, mask, fns[0]().view(1, -1))  # the first call autotunes, outside any capture
    except Exception as e:
        log(f"FAILED teal K={case.K} N={case.N} s={s}: {type(e).__name__}: {str(e)[:300]}")
        records.append(dict(rec, impl="teal", failed=str(e)[:300]))
        return
    fb, kept = case.floor_bytes(x, mask)
    record(records, log, rec, "teal", time_us(fns), dense_us, fb / bw * 1e6, kept, err)


def run_main(args, bw, records, log, save):
    shapes = [(5120, 17920)] if args.quick else SHAPES
    teal = load_teal(args.teal) if args.teal else None
    for (K, N), dtype in itertools.product(shapes, DTYPES):
        case = Case(K, N, dtype)
        dname = str(dtype).replace("torch.", "")
        for M in args.batches:
            x = case.inputs(M)
            dense = [lambda w=w: F.linear(x, w) for w in case.w]
            dense_us = time_us(dense)
            dense_floor = case.floor_bytes(x, None)[0] / bw * 1e6
            extra = {"dense_kn": time_us([lambda wt=wt: torch.mm(x, wt) for wt in case.wt])}  # on W^T (K, N)
            if M == 1:
                extra["dense_flushed"] = time_us(dense, flush=True)
            for s in SPARSITIES:
                thr = case.threshold(x, s)
                rec = dict(K=K, N=N, batch=M, dtype=dname, sparsity=s)
                record(records, log, rec, "dense", dense_us, dense_us, dense_floor, 1.0, 0.0)
                for name, us in extra.items():
                    ref_us = extra["dense_flushed"] if name == "dense_flushed" else dense_us
                    record(records, log, rec, name, us, ref_us, dense_floor, 1.0, 0.0)
                if teal is not None and M == 1 and dtype == torch.float16:
                    teal_record(teal, case, x, s, rec, dense_us, bw, records, log)
                impls = {"wina_threshold": (None, dict(thr=thr, hint=s))}
                if M == 1:  # the two GEMV kernels forced, also at 0 % (threshold -1 keeps all in-kernel)
                    t_kernel = thr if s > 0 else -1.0
                    impls["wina_masked"] = ("gemv_masked", dict(thr=t_kernel))
                    impls["wina_compact"] = ("gemv", dict(thr=t_kernel))
                    impls["wina_topk"] = (None, dict(k=round((1 - s) * K)))
                for impl, (path, kw) in impls.items():
                    fns = wina_fns(case, x, path=path, **kw)
                    mask = (reference.threshold_mask(x, case.score, kw["thr"]) if "k" not in kw
                            else reference.topk_mask(x, case.score, kw["k"]))
                    try:
                        err = check(case, x, mask, fns[0]())
                    except Exception as e:  # recorded and reported, never timed
                        log(f"FAILED {impl} K={K} N={N} M={M} s={s} {dname}: {type(e).__name__}: {str(e)[:300]}")
                        records.append(dict(rec, impl=impl, failed=str(e)[:300]))
                        continue
                    fb, kept = case.floor_bytes(x, mask)
                    record(records, log, rec, impl, time_us(fns), dense_us, fb / bw * 1e6, kept, err)
                    if M == 1 and impl == "wina_threshold":
                        record(records, log, rec, impl + "_flushed", time_us(fns, flush=True),
                               extra["dense_flushed"], fb / bw * 1e6, kept, err)
                    if (K, N, M, s, impl) == (5120, 17920, 1, 0.5, "wina_threshold"):  # launch cost, no graph
                        ed, ew = eager_us(dense), eager_us(fns)
                        record(records, log, rec, "dense_eager", ed, dense_us, dense_floor, 1.0, 0.0)
                        record(records, log, rec, "wina_threshold_eager", ew, dense_us, fb / bw * 1e6, kept, err)
        save()  # after every shape, so a run cut short still leaves its numbers
        del case
        torch.cuda.empty_cache()


def run_compiled(bw, records, log, save):
    """The batched path as the backend runs it: RMSNorm -> linear, compiled by Inductor, where
    the keep mask fuses into the norm's kernel (records dense_compiled / wina_compiled)."""
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    for K, N in SHAPES:
        torch._dynamo.reset()
        case = Case(K, N, torch.bfloat16)
        nw = torch.ones(K, device=DEVICE, dtype=torch.bfloat16)
        norm = lambda h: (h.float() * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(h.dtype) * nw
        dense_f = torch.compile(lambda h, w: F.linear(norm(h), w), dynamic=False)
        wina_f = torch.compile(lambda h, wt, t: sl.threshold_linear(norm(h), wt, None, case.score, t), dynamic=False)
        for M in [b for b in BATCHES if b > 1]:
            h = case.inputs(M)
            xn = norm(h)
            dense_us = time_us([lambda w=w: dense_f(h, w) for w in case.w[:3]])
            floor = case.floor_bytes(xn, None)[0] / bw * 1e6
            for s in [0.25, 0.5, 0.9]:
                rec = dict(K=K, N=N, batch=M, dtype="bfloat16", sparsity=s)
                record(records, log, rec, "dense_compiled", dense_us, dense_us, floor, 1.0, 0.0)
                thr = case.threshold(xn, s)
                mask = reference.threshold_mask(xn, case.score, thr)
                ref = F.linear((xn * mask).float(), case.w[0].float())
                # Inductor decides the mask on the norm's unrounded fp32 value, so borderline
                # channels may flip against this bf16 reference: a looser check (NaN never passes)
                err = rel_err(wina_f(h, case.wt[0], thr), ref)
                if not err < 0.1:
                    log(f"FAILED wina_compiled K={K} N={N} M={M} s={s}: rel err {err}")
                    records.append(dict(rec, impl="wina_compiled", failed=f"rel err {err}"))
                    continue
                us = time_us([lambda wt=wt: wina_f(h, wt, thr) for wt in case.wt[:3]])
                record(records, log, rec, "wina_compiled", us, dense_us, floor, float(mask.any(0).float().mean()), err)
        save()
        del case
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- tuning sweep
GEMV_CANDIDATES = [  # (BLOCK_N, BLOCK_R, num_warps, STAGES, programs per SM; 0 = no split-K)
    (128, 64, 4, 3, 2), (128, 32, 4, 3, 4), (64, 128, 4, 2, 2), (64, 128, 4, 3, 0), (256, 32, 4, 3, 2),
    (128, 64, 4, 3, 1), (64, 64, 4, 3, 4), (128, 64, 4, 4, 3),
]


def gemv_cfg(c, K, N, M, sms):
    bn, r, w, st, per_sm = c
    split = 1 if per_sm == 0 else max(1, min(triton.cdiv(per_sm * sms, triton.cdiv(N, bn) * M), K // 256, 64))
    return dict(BLOCK_N=bn, BLOCK_R=r, SPLIT_K=split, STAGES=st, num_warps=w)


def try_time(case, x, mask, path, cfg, thr, log):
    fns = wina_fns(case, x, path=path, config=cfg, thr=thr)
    try:
        check(case, x, mask, fns[0]())
        return time_us(fns)
    except Exception as e:  # a config that does not compile or run is reported, not fatal
        log(f"  {path} {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
        return None


def calibrate(log, sweep):
    """Timing floor of this method: graphs of an empty kernel, a memset, and both."""
    from kernels import sparse_linear_kernels as kern

    buf = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    empty = lambda: sl._launch(kern._prep_kernel, (1, 1), buf, buf, buf, buf, 1, 0, 0, 0, 0.0, 0,
                               TOPK=False, BLOCK_K=1024, num_warps=4)
    memset = lambda: torch.zeros(64, dtype=torch.int32, device=DEVICE)
    for name, f in [("empty_kernel", empty), ("memset", memset), ("memset+kernel", lambda: (memset(), empty()))]:
        us = time_us([f])
        sweep.append(dict(kind="calibrate", name=name, us=us))
        log(f"calibrate {name:14s} {us:6.2f} us")


def run_sweep(args, bw, sweep, log, save):
    sms = num_sms()
    calibrate(log, sweep)
    for K, N in SHAPES:  # decode tiles, fp16
        case = Case(K, N, torch.float16)
        x = case.inputs(1)
        dense_us = time_us([lambda w=w: F.linear(x, w) for w in case.w])
        for s in [0.0, 0.5, 0.9]:
            thr = case.threshold(x, s)
            mask = reference.threshold_mask(x, case.score, thr)
            floor = case.floor_bytes(x, mask)[0] / bw * 1e6
            row = []
            for c in GEMV_CANDIDATES:
                cfg = gemv_cfg(c, K, N, 1, sms)
                us = try_time(case, x, mask, "gemv", cfg, thr, log)
                sweep.append(dict(K=K, N=N, batch=1, sparsity=s, kind="gemv", cand=list(c), cfg=cfg, us=us,
                                  dense_us=dense_us, floor_us=floor))
                row.append(f"{us:6.1f}" if us else "  fail")
            log(f"sweep M=1 K={K:5d} N={N:5d} s={s:.1f} dense {dense_us:6.1f} floor {floor:5.1f} | " + " ".join(row))
        thr_half = case.threshold(x, 0.5)
        for kind, k in [("prep_threshold", None), ("prep_topk", K // 2)]:
            us = time_us([lambda k=k: sl._prep(x, case.score, thr_half, k)])
            sweep.append(dict(K=K, N=N, batch=1, kind=kind, us=us))
            log(f"sweep {kind} K={K}: {us:.1f} us")
        save()
        del case
        torch.cuda.empty_cache()
    # the dispatch rule: per-token sparse GEMV vs masked GEMM vs dense fallback, by M
    for K, N in [(5120, 17920), (4096, 4096), (14336, 4096)]:
        case = Case(K, N, torch.float16)
        for M in [2, 4, 8, 16, 32, 64, 128, 256]:
            x = case.inputs(M)
            dense_us = time_us([lambda w=w: F.linear(x, w) for w in case.w])
            for s in [0.0, 0.5, 0.9]:
                thr = case.threshold(x, s)
                mask = reference.threshold_mask(x, case.score, thr)
                row = []
                for name, path in [("gemv", "gemv"), ("gemm", "gemm"), ("fallback", "dense")][M > 8:]:
                    us = try_time(case, x, mask, path, None, thr, log)
                    row.append(f"{name} {us:6.1f}" if us else f"{name} fail")
                    sweep.append(dict(K=K, N=N, batch=M, sparsity=s, kind=f"rule_{name}", us=us, dense_us=dense_us,
                                      rows_kept=float(mask.any(0).float().mean())))
                log(f"sweep rule M={M:3d} K={K:5d} N={N:5d} s={s:.1f} dense {dense_us:6.1f} | " + " | ".join(row))
        save()
        del case
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- M=1 variants
# name: (path, BLOCK_N, BLOCK_K or BLOCK_R, programs per SM, STAGES, num_warps, REDUCE)
# (REDUCE 1: the last ticket sums the split-K partials; 0: a second reduce launch)
VARIANTS = {
    "gemv_r": ("gemv", 128, 64, 1, 3, 4, 0),
    "gemv_r_n64": ("gemv", 64, 128, 2, 3, 4, 0),
    "gemv_r_n32": ("gemv", 32, 256, 2, 3, 4, 0),
    "m_n64k128_t": ("gemv_masked", 64, 128, 2, 3, 4, 1),
    "m_n64k128": ("gemv_masked", 64, 128, 2, 3, 4, 0),
    "m_n64k256": ("gemv_masked", 64, 256, 2, 3, 4, 0),
    "m_n32k128": ("gemv_masked", 32, 128, 2, 3, 4, 0),
    "m_n32k256": ("gemv_masked", 32, 256, 2, 3, 4, 0),
    "m_n32k256_s4": ("gemv_masked", 32, 256, 2, 4, 4, 0),
    "m_n32k256_s2": ("gemv_masked", 32, 256, 2, 2, 4, 0),
    "m_n32k256_3sm": ("gemv_masked", 32, 256, 3, 3, 4, 0),
    "m_n32k256_1sm": ("gemv_masked", 32, 256, 1, 3, 4, 0),
    "m_n32k512": ("gemv_masked", 32, 512, 2, 3, 4, 0),
    "m_n32k512_w8": ("gemv_masked", 32, 512, 2, 3, 8, 0),
    "m_n16k512": ("gemv_masked", 16, 512, 2, 3, 4, 0),
}
LAYER = [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096)]


def variant_cfg(name, K, N, sms, M=1):
    path, bn, bk, per_sm, st, w, reduce = VARIANTS[name]
    split = max(1, min(triton.cdiv(per_sm * sms, triton.cdiv(N, bn) * M), K // 256, 32))
    cfg = dict(BLOCK_N=bn, SPLIT_K=split, STAGES=st, REDUCE=reduce, num_warps=w)
    cfg["BLOCK_K" if path == "gemv_masked" else "BLOCK_R"] = bk
    return path, cfg


def run_variants(bw, out, log):
    """M=1 kernels side by side: single calls on decode shapes, then a chain of the 7 linears of
    two Llama-3-8B layers in one CUDA graph (per-layer time, launch gaps included)."""
    from kernels import sparse_linear_kernels as kern

    sms, res = num_sms(), []

    def save(res):
        with open(os.path.join(out, f"variants_{gpu_tag()}.json"), "w") as f:
            json.dump(dict(header=device_header(bw), variants={k: list(v) for k, v in VARIANTS.items()}, results=res), f)

    buf = torch.zeros(64, dtype=torch.int32, device=DEVICE)
    empty = lambda: sl._launch(kern._prep_kernel, (1, 1), buf, buf, buf, buf, 1, 0, 0, 0, 0.0, 0,
                               TOPK=False, BLOCK_K=1024, num_warps=4)
    for n in [1, 20]:
        us = time_us([lambda: [empty() for _ in range(n)]])
        res.append(dict(kind="empty_chain", n=n, us=us))
        log(f"graph of {n:2d} empty kernels: {us:6.2f} us")
    for (K, N), dtype in [((4096, 4096), torch.bfloat16), ((4096, 1024), torch.bfloat16),
                          ((4096, 14336), torch.bfloat16), ((14336, 4096), torch.bfloat16),
                          ((5120, 17920), torch.float16)]:
        case = Case(K, N, dtype)
        x = case.inputs(1)
        base = dict(dense=time_us([lambda w=w: F.linear(x, w) for w in case.w]),
                    dense_kn=time_us([lambda wt=wt: torch.mm(x, wt) for wt in case.wt]))
        for s in [0.0, 0.5, 0.65, 0.9]:
            thr = case.threshold(x, s)
            mask = reference.threshold_mask(x, case.score, thr)
            floor = case.floor_bytes(x, mask)[0] / bw * 1e6
            row = dict(base)
            for name in VARIANTS:
                path, cfg = variant_cfg(name, K, N, sms)
                row[name] = try_time(case, x, mask, path, cfg, thr, log)
            res.append(dict(kind="single", K=K, N=N, dtype=str(dtype), sparsity=s, floor_us=floor, us=row))
            log(f"K={K:5d} N={N:5d} s={s:.2f} floor {floor:5.1f} | " +
                " ".join(f"{k} {v:5.1f}" if v else f"{k} fail" for k, v in row.items()))
        del case
        torch.cuda.empty_cache()
    # chain: two layers' linears (~0.9 GB bf16, so no weight byte comes from L2)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    layers = [[(torch.randn(N, K, device=DEVICE, generator=g) * K**-0.5).bfloat16() for K, N in LAYER] for _ in range(2)]
    wts = [[w.t().contiguous() for w in ws] for ws in layers]
    scores = [[w.float().norm(dim=0) for w in ws] for ws in layers]
    xs = {K: torch.randn(1, K, device=DEVICE, generator=g).bfloat16() for K in (4096, 14336)}
    for s in [0.0, 0.25, 0.5, 0.65, 0.8]:
        thr = [[reference.importance(xs[w.shape[1]], sc).float().quantile(s).item() if s > 0 else -1.0
                for w, sc in zip(ws, scs)] for ws, scs in zip(layers, scores)]
        row = dict(dense=time_us([lambda: [F.linear(xs[w.shape[1]], w) for ws in layers for w in ws]]) / 2)
        for name in ["auto"] + list(VARIANTS):
            def chain(name=name):
                for ws, wt_l, scs, ths in zip(layers, wts, scores, thr):
                    for w, wt, sc, t in zip(ws, wt_l, scs, ths):
                        K, N = w.shape[1], w.shape[0]
                        path, cfg = (None, None) if name == "auto" else variant_cfg(name, K, N, sms)
                        sl._sparse_linear(xs[K], wt, None, sc, threshold=t, path=path, config=cfg)
            try:
                row[name] = time_us([chain]) / 2
            except Exception as e:
                log(f"chain {name} failed: {type(e).__name__}: {str(e)[:200]}")
        res.append(dict(kind="layer_chain", sparsity=s, us_per_layer=row))
        log(f"layer chain s={s:.2f} us/layer | " + " ".join(f"{k} {v:6.1f}" for k, v in row.items()))
    del layers, wts
    torch.cuda.empty_cache()
    save(res)


GROUPS = {"qkv": (4096, (4096, 1024, 1024)), "gate_up": (4096, (14336, 14336))}  # Llama-3-8B, bf16


def masked_tiles(block_n, block_k, per_sm=2, warps=4, stages=3):
    """Tiles of the masked GEMV for linears of K inputs and `sizes` outputs side by side,
    with the split-K the launcher's rule gives for them (about per_sm programs per SM)."""
    def cfg(K, sizes):
        tiles = sum(triton.cdiv(n, block_n) for n in sizes)
        split = max(1, min(triton.cdiv(per_sm * num_sms(), tiles), K // 256, 32))
        return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=stages, num_warps=warps)
    return cfg


# kernels timed on groups and single linears: name -> (path, tiles); tiles None (as the
# launcher picks them), a dict of overrides, or masked_tiles(...).  Runs 14 and 17 swept
# 8 masked_tiles variants each (kernels_h100_groups*.json, "tiles").
GROUP_VARIANTS = {"grouped": (None, None), "compacted": ("gemv", None)}  # None: as dispatched


def _tiles(variant, K, sizes):
    return variant(K, sizes) if callable(variant) else variant


def _group_linear(x, wt, score, thresholds, sizes, variant, K):
    """One launch of a variant over linears side by side (a single linear when len(sizes) == 1)."""
    path, tiles = variant
    group = (tuple(sizes), tuple(thresholds)) if len(sizes) > 1 else None
    return sl._sparse_linear(x, wt, None, score, threshold=thresholds[0], group=group, path=path,
                             config=_tiles(tiles, K, sizes))


def run_groups(bw, out, log):
    """Linears sharing an input, bf16, M = 1: one launch per linear (separate) vs one grouped
    launch, beside cuBLAS per linear and cuBLAS on the weights side by side; then a chain of
    two Llama-3-8B layers' linears as the backend runs them (4 launches per layer grouped,
    7 separate).  Writes groups_<gpu>.json and .png."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    res = []
    sparsities = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8]

    def weights(K, sizes, copies):
        return [[(torch.randn(n, K, device=DEVICE, generator=g) * K**-0.5).bfloat16() for n in sizes]
                for _ in range(copies)]

    def group_thresholds(x, scores, s):
        return [reference.importance(x, sc).float().quantile(s).item() if s > 0 else -math.inf for sc in scores]

    for K, N, dtype in [(5120, 17920, torch.float16), (4096, 14336, torch.bfloat16), (4096, 4096, torch.bfloat16)]:
        case = Case(K, N, dtype)
        x = case.inputs(1)
        dense_us = time_us([lambda w=w: F.linear(x, w) for w in case.w])
        for s in [0.0, 0.5, 0.65, 0.8, 0.9]:
            thr = case.threshold(x, s) if s > 0 else -1.0  # -1: the kernel, not the keep-all cuBLAS
            mask = reference.threshold_mask(x, case.score, thr)
            floor = case.floor_bytes(x, mask)[0] / bw * 1e6
            us = dict(dense=dense_us)
            for impl, variant in GROUP_VARIANTS.items():
                check(case, x, mask, _group_linear(x, case.wt[0], case.score, [thr], [N], variant, K))
                us[impl] = time_us([lambda wt=wt, v=variant: _group_linear(x, wt, case.score, [thr], [N], v, K)
                                    for wt in case.wt])
            res.append(dict(kind="single", K=K, N=N, dtype=str(dtype), sparsity=s, floor_us=floor, us=us))
            log(f"single {K}x{N} s={s:.2f} floor {floor:6.1f} | " + " ".join(f"{k} {v:6.1f}" for k, v in us.items()))
        del case
        torch.cuda.empty_cache()

    for name, (K, sizes) in GROUPS.items():
        copies = max(NBUF_MIN, -(-int(ROTATE_BYTES) // (K * sum(sizes) * 2)))
        ws = weights(K, sizes, copies)
        wts = [[w.t().contiguous() for w in members] for members in ws]
        cats = [torch.cat(members, 1).contiguous() for members in wts]
        full = [torch.cat(members, 0) for members in ws]
        scores = [w.float().norm(dim=0) for w in ws[0]]
        stacked = torch.stack(scores)
        x = torch.randn(1, K, device=DEVICE, generator=g).bfloat16()
        dense_sep = time_us([lambda m=m: [F.linear(x, w) for w in m] for m in ws])
        dense_cat = time_us([lambda w=w: F.linear(x, w) for w in full])
        for s in sparsities:
            thr = group_thresholds(x, scores, s)
            ref = reference.threshold_linear_group(x.double(), full[0].double(), None, stacked, thr, sizes)
            err = rel_err(sl.threshold_linear_group(x, cats[0], None, stacked, thr, list(sizes)), ref)
            if not err < 2e-2:
                raise AssertionError(f"group {name} s={s}: rel err {err}")
            kept = sum(int(reference.threshold_mask(x, sc, t).sum()) * n for sc, t, n in zip(scores, thr, sizes))
            floor = (kept * 2 + x.numel() * 2 + sum(sizes) * 2) / bw * 1e6
            us = dict(dense_separate=dense_sep, dense_side_by_side=dense_cat)
            us["separate"] = time_us([lambda m=m: [sl.threshold_linear(x, wt, None, sc, t)
                                                   for wt, sc, t in zip(m, scores, thr)] for m in wts])
            for impl, variant in GROUP_VARIANTS.items():
                y = _group_linear(x, cats[0], stacked, thr, sizes, variant, K)
                if not rel_err(y, ref) < 2e-2:
                    raise AssertionError(f"group {name} {impl} s={s}: rel err {rel_err(y, ref)}")
                us[impl] = time_us([lambda c=c, v=variant: _group_linear(x, c, stacked, thr, sizes, v, K) for c in cats])
            res.append(dict(kind="group", group=name, K=K, sizes=list(sizes), sparsity=s, floor_us=floor, err=err, us=us))
            log(f"{name:7s} s={s:.2f} floor {floor:6.1f} | " + " ".join(f"{k} {v:6.1f}" for k, v in us.items()))
        del ws, wts, cats, full
        torch.cuda.empty_cache()

    # two layers: q/k/v, o, gate/up, down (0.9 GB bf16: no weight byte from L2)
    layers = []
    for _ in range(2):
        qkv, (o,), gu, (down,) = (weights(4096, (4096, 1024, 1024), 1)[0], weights(4096, (4096,), 1)[0],
                                  weights(4096, (14336, 14336), 1)[0], weights(14336, (4096,), 1)[0])
        layers.append(dict(qkv=qkv, o=[o], gu=gu, down=[down]))
    xs = {4096: torch.randn(1, 4096, device=DEVICE, generator=g).bfloat16(),
          14336: torch.randn(1, 14336, device=DEVICE, generator=g).bfloat16()}
    for layer in layers:
        for part, ws in list(layer.items()):
            layer[part] = dict(w=ws, wt=[w.t().contiguous() for w in ws], cat=torch.cat([w.t() for w in ws], 1).contiguous(),
                               scores=[w.float().norm(dim=0) for w in ws], sizes=[w.shape[0] for w in ws])
            layer[part]["stacked"] = torch.stack(layer[part]["scores"])
    for s in sparsities:
        for layer in layers:
            for part in layer.values():
                part["thr"] = group_thresholds(xs[part["w"][0].shape[1]], part["scores"], s)

        def chain(variant):  # variant None: one launch per linear, as dispatched
            for layer in layers:
                for part in layer.values():
                    x = xs[part["w"][0].shape[1]]
                    if variant is not None:
                        score = part["stacked"] if len(part["sizes"]) > 1 else part["scores"][0]
                        _group_linear(x, part["cat"], score, part["thr"], part["sizes"], variant, x.shape[1])
                    else:
                        for wt, sc, t in zip(part["wt"], part["scores"], part["thr"]):
                            sl.threshold_linear(x, wt, None, sc, t)

        dense = time_us([lambda: [F.linear(xs[w.shape[1]], w) for layer in layers for p in layer.values() for w in p["w"]]]) / 2
        row = dict(dense=dense, separate=time_us([lambda: chain(None)]) / 2)
        for impl, variant in GROUP_VARIANTS.items():
            row[impl] = time_us([lambda v=variant: chain(v)]) / 2
        kept = sum(int(reference.threshold_mask(xs[w.shape[1]], sc, t).sum()) * w.shape[0]
                   for layer in layers for p in layer.values() for w, sc, t in zip(p["w"], p["scores"], p["thr"]))
        floor = kept * 2 / bw * 1e6 / 2
        res.append(dict(kind="layer_chain", sparsity=s, floor_us=floor, us_per_layer=row))
        log(f"layer chain s={s:.2f} us/layer: floor {floor:6.1f} | " + " ".join(f"{k} {v:6.1f}" for k, v in row.items())
            + f" | grouped {row['dense'] / row['grouped']:4.2f}x dense, separate {row['dense'] / row['separate']:4.2f}x")
    del layers
    torch.cuda.empty_cache()
    path = os.path.join(out, f"groups_{gpu_tag()}.json")
    with open(path, "w") as f:
        json.dump(dict(header=device_header(bw), groups={k: [v[0], list(v[1])] for k, v in GROUPS.items()},
                       variants={k: [p, _tiles(t, 4096, [4096, 1024, 1024]) or "as dispatched"]
                                 for k, (p, t) in GROUP_VARIANTS.items()},
                       results=res), f, indent=1)
    plot_groups(res, device_header(bw), path.replace(".json", ".png"))


def plot_groups(res, header, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [("group", "qkv", "q/k/v 4096->4096+1024+1024"), ("group", "gate_up", "gate/up 4096->2x14336"),
              ("layer_chain", None, "Llama-3-8B layer, 7 linears, per layer")]
    for ax, (kind, name, title) in zip(axes, panels):
        rows = [r for r in res if r["kind"] == kind and r.get("group") == name]
        xs = [r["sparsity"] for r in rows]
        key = "us" if kind == "group" else "us_per_layer"
        colors = {"dense": "C0", "dense_separate": "C0", "dense_side_by_side": "C1", "separate": "C2", "grouped": "C3",
                  "compacted": "C4"}
        for impl in [i for i in rows[0][key] if i in colors]:
            ax.plot(xs, [r[key][impl] for r in rows], "o-", color=colors[impl], label=impl.replace("_", " "))
        ax.plot(xs, [r["floor_us"] for r in rows], "k--", label="bandwidth floor")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("sparsity")
        ax.set_ylabel("us, batch 1, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(f"{header['gpu']}, torch {header['torch']}, triton {header['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def inductor_code(log):
    """Which kernels Inductor emits around the custom op (launch count per sparse linear)."""
    from torch._inductor.utils import run_and_get_code

    for K, N, t, M in [(4096, 14336, 0.3, 1), (4096, 1024, 0.3, 1), (4096, 4096, -float("inf"), 1), (4096, 4096, 0.3, 64)]:
        w = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16)
        wt, sc = w.t().contiguous(), w.float().norm(dim=0)
        fn = torch.compile(lambda x: torch.ops.wina.threshold_linear(torch.nn.functional.silu(x), wt, None, sc, t),
                           fullgraph=True)
        _, code = run_and_get_code(fn, torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16))
        calls = [ln.strip()[:110] for ln in code[-1].splitlines() if ".run(" in ln or "extern_kernels" in ln
                 or "aten." in ln or "cuda_stream" in ln and "=" not in ln]
        log(f"inductor M={M} K={K} N={N} t={t}: " + " | ".join(c for c in calls if not c.startswith("#")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--no-main", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=BATCHES,
                    help="comma-separated token counts (default %(default)s)")
    ap.add_argument("--teal", metavar="PATH", help="TEAL's kernels/sparse_gemv.py: also time its kernel (impl teal)")
    ap.add_argument("--variants", action="store_true", help="M=1 kernel variants and a layer chain, then exit")
    ap.add_argument("--groups", action="store_true", help="grouped launches (q/k/v, gate/up) vs separate, then exit")
    ap.add_argument("--plot-groups", metavar="JSON", help="redraw the PNG of a groups JSON (no GPU needed), then exit")
    args = ap.parse_args()
    if args.plot_groups:
        with open(args.plot_groups) as f:
            saved = json.load(f)
        plot_groups(saved["results"], saved["header"], args.plot_groups.replace(".json", ".png"))
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    out = out_dir()
    tag = gpu_tag()
    logf = open(os.path.join(out, f"kernels_{tag}.log"), "a")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    t0 = time.time()
    bw = copy_bandwidth()
    header = device_header(bw)
    log(f"{header['gpu']} torch {header['torch']} triton {header['triton']}: copy bandwidth {bw / 1e12:.2f} TB/s")
    if args.groups:
        run_groups(bw, out, log)
        log(f"groups done at {time.time() - t0:.0f} s")
        return
    if args.variants:
        inductor_code(log)
        run_variants(bw, out, log)
        log(f"variants done at {time.time() - t0:.0f} s")
        return
    if args.sweep:
        sweep = []

        def save_sweep():
            with open(os.path.join(out, f"sweep_{tag}.json"), "w") as f:
                json.dump(dict(header=header, sweep=sweep), f)

        run_sweep(args, bw, sweep, log, save_sweep)
        save_sweep()
        log(f"sweep done at {time.time() - t0:.0f} s")
    if args.no_main:
        return
    records = []
    path = os.path.join(out, f"kernels_{tag}.json")

    def save():
        with open(path, "w") as f:
            json.dump(dict(header=header, records=records), f, indent=1)

    run_main(args, bw, records, log, save)
    save()
    if not args.quick and any(b > 1 for b in args.batches):
        run_compiled(bw, records, log, save)
        save()
    try:
        from benchmarks.plot import plot

        plot(dict(header=header, records=records), path.replace(".json", ".png"), 5120, 17920, "float16")
    except Exception as e:  # plotting is optional
        log(f"plot failed: {e}")
    # short table: batch-1 speedups on 5120x17920 fp16, and worst batched ratio per shape
    log("\nfp16 K=5120 N=17920 batch 1: speedup over cuBLAS -- dispatched | masked kernel | compact kernel | "
        "dispatched, do_bench flush on | top-k | 1/(1-s) | TEAL (ANCHORS) -- and dispatched latency vs floor")
    teal = {0.0: 1.10, 0.25: 1.39, 0.4: 1.65, 0.5: 1.87, 0.65: 2.15, 0.8: 2.35, 0.9: 2.56}
    impls = ["wina_threshold", "wina_masked", "wina_compact", "wina_threshold_flushed", "wina_topk"]
    for s in SPARSITIES:
        r = {x["impl"]: x for x in records if (x["K"], x["N"], x["batch"], x["dtype"], x["sparsity"]) ==
             (5120, 17920, 1, "float16", s)}
        if all(i in r and "us" in r[i] for i in impls):
            t = r["wina_threshold"]
            log(f"  s={s:.2f}  " + " | ".join(f"{r[i]['speedup_vs_dense']:5.2f}" for i in impls) +
                f" | {1 / (1 - s):5.2f} | {teal[s]:4.2f}   {t['us']:6.1f} us, floor {t['floor_us']:6.1f} us "
                f"({100 * t['floor_us'] / t['us']:3.0f}%)")
    log("\nworst time / dense over sparsities, per shape and batch: wina_threshold (fp16, bf16), "
        "then compiled norm+linear (bf16)")
    for (K, N) in ([(5120, 17920)] if args.quick else SHAPES):
        line = []
        for M in args.batches:
            for d, impl in [("float16", "wina_threshold"), ("bfloat16", "wina_threshold"), ("bfloat16", "wina_compiled")]:
                rs = [x for x in records if (x["K"], x["N"], x["batch"], x["dtype"], x["impl"]) ==
                      (K, N, M, d, impl) and "us" in x]
                if rs:
                    line.append(f"M={M} {d[:4]}{' compiled' if 'compiled' in impl else ''} "
                                f"{max(1 / x['speedup_vs_dense'] for x in rs):4.2f}")
        log(f"  {K}x{N}: " + "  ".join(line))
    log(f"done in {time.time() - t0:.0f} s -> {path}")


if __name__ == "__main__":
    main()
