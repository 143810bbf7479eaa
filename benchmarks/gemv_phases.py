"""Where a one-token GEMV's fixed cost goes: timestamps taken inside every program.

    python benchmarks/gemv_phases.py [--cases o,down] [--kept 0,0.5,1]

Session 16's fit (``gemv_fixed_cost.py``) left about 3.5 us per launch that no weight byte
explains, beyond a graph of one empty kernel, and session 17's variants ruled out the
split-K atomics (half the splits, tickets or a second launch were no faster).  This probe
runs the dispatched masked tiles (``_masked_prefetched`` and ``_finish``, the library's own
code) in a kernel that also reads each program's clocks: ``%globaltimer`` when it starts and
ends (one clock for the whole GPU: the launch ramp and the end spread) and the SM's
``%clock64`` at its start, when its column sums are complete (the loop over its weight rows),
and after its split-K sum is added and its ticket taken (the tail).  It prints, per case and
kept fraction, the kernel's time in the usual harness beside the library kernel's (so the
probe's own cost shows), and the distribution of each phase over the programs.

Session 17 also probed a split-K mode 3 with it, measured and dropped: each program added
its partial in 64-bit fixed point together with a count, one atomic with a return value per
output instead of the fence, ticket and exchange; the tail took 2.2x as long (128 such
atomics onto each word).

GPU only (inline PTX).  Writes ``gemv_phases_<gpu>.json`` to $OUT (else benchmarks/results/).
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch
import triton
import triton.language as tl

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("wina_tune_gemv", os.path.join(HERE, "tune_gemv.py"))
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)  # loads benchmarks/kernels.py, which puts the source tree on sys.path
bench = tune.bench
from kernels import reference, sparse_linear as sl, sparse_linear_kernels as kern  # noqa: E402

CASES = {"o": (4096, 4096), "down": (14336, 4096), "5120x17920": (5120, 17920)}  # (K, N)
FIELDS = ("start_ns", "start_clk", "summed_clk", "ticket_clk", "end_ns", "sm")


@triton.jit
def _clock(after):
    """The SM's cycle counter, read once ``after`` (an int32 tensor) is known."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,r", [after], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _global_ns(after):
    """The GPU's nanosecond timer, read once ``after`` (an int32 tensor) is known."""
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [after], dtype=tl.int64, is_pure=False,
                                     pack=1)


@triton.jit
def _phases_kernel(x_ptr, wt_ptr, score_ptr, out_ptr, cnt_ptr, t_ptr, N, K, stride_wk, threshold, K_PER_SPLIT,
                   SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK: tl.constexpr):
    """_gemv_masked_kernel's wide path for one linear and one token, with PDL and float32
    atomics (REDUCE 2), plus the clocks of FIELDS stored per program into t (6 int64 each)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    zero = tl.zeros([1], tl.int32)
    start_ns = _global_ns(zero)
    start_clk = _clock(zero)
    pid_n += kern._launch_dependents()
    m = kern._wait_for_prior()
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    col0 = pid_n * BLOCK_N
    acc = kern._masked_prefetched(x_ptr + m * K, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, N, 0,
                                  BLOCK_N, BLOCK_K, UNPACK)
    summed_clk = _clock(tl.sum(acc, axis=1).to(tl.int32, bitcast=True))
    offs_n = col0 + tl.arange(0, BLOCK_N)
    kern._finish(acc, m + tl.arange(0, 1), offs_n, 1, N, out_ptr, N, out_ptr, out_ptr, cnt_ptr, pid_n,
                 tl.num_programs(0), pid_k, SPLIT_K, False, 2, N)
    tl.debug_barrier()
    ticket_clk = _clock(zero + m)
    end_ns = _global_ns(zero + m)
    sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r,r", [zero], dtype=tl.int32, is_pure=False, pack=1)
    row = t_ptr + (pid_k * tl.num_programs(0) + pid_n) * 6 + tl.arange(0, 1)
    tl.store(row, start_ns)
    tl.store(row + 1, start_clk)
    tl.store(row + 2, summed_clk)
    tl.store(row + 3, ticket_clk)
    tl.store(row + 4, end_ns)
    tl.store(row + 5, sm.to(tl.int64))


def quantiles(v: torch.Tensor) -> dict:
    v = v.double()
    return {q: float(v.quantile(p)) for q, p in (("p10", 0.1), ("p50", 0.5), ("p90", 0.9), ("max", 1.0))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="o,down", help=f"of {', '.join(CASES)}")
    ap.add_argument("--kept", default="0,0.5,1", help="kept fractions of the input channels")
    ap.add_argument("--hint", type=float, default=0.5, help="calibrated sparsity that picks the tiles")
    args = ap.parse_args()
    if set(args.cases.split(",")) - set(CASES):
        ap.error(f"unknown cases {sorted(set(args.cases.split(',')) - set(CASES))}; choose from {', '.join(CASES)}")
    bw = bench.copy_bandwidth()
    header = dict(bench.device_header(bw), hint=args.hint)
    print(f"{header['gpu']}  torch {torch.__version__}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s")
    empty_us = bench.empty_graph_us()
    print(f"graph of one empty kernel: {empty_us:.2f} us")
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = torch.zeros(sl.workspace_size(17920), dtype=torch.int32, device="cuda")
    records = []
    for name in args.cases.split(","):
        K, N = CASES[name]
        dtype = torch.float16 if name == "5120x17920" else torch.bfloat16
        ws_t, scores = tune.case_weights(K, (N,), g, dtype)
        x = torch.randn(1, K, device="cuda", generator=g).to(dtype)
        path, cfg = sl._gemv_choice(N, K, bench.num_sms(), args.hint)
        if path != "gemv_masked":
            raise SystemExit(f"{name}: the dispatch picks {path} at {args.hint}; the probe covers the masked tiles")
        k_per, split = sl.k_ranges(path, K, cfg)
        grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
        unpack = dtype == torch.bfloat16
        for kept in [float(v) for v in args.kept.split(",")]:
            thr = float("inf") if kept == 0 else (-1.0 if kept == 1 else
                                                  reference.importance(x, scores[0]).float().quantile(1 - kept).item())
            out = torch.empty(1, N, device="cuda", dtype=dtype)
            t = torch.zeros(grid[0] * grid[1], 6, dtype=torch.int64, device="cuda")

            def probe(w):
                cnt = ws[:grid[0] + N]
                _phases_kernel[grid](x, w, scores[0], out, cnt, t, N, K, w.stride(0), thr, k_per, SPLIT_K=split,
                                     BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], UNPACK=unpack,
                                     num_warps=cfg["num_warps"])
                return out

            def library(w):
                return sl._sparse_linear(x, w, None, scores[0], threshold=thr, path=path, config=cfg,
                                         sparsity_hint=args.hint, workspace=ws)

            ref = reference.threshold_linear(x.double(), ws_t[0].t().double(), None, scores[0], thr)
            for fn in (probe, library):
                err = bench.rel_err(fn(ws_t[0]), ref) if kept > 0 else float(fn(ws_t[0]).abs().max())
                assert err < 2e-2, (name, kept, fn.__name__, err)
            probe_us = bench.time_us([lambda w=w: probe(w) for w in ws_t])
            library_us = bench.time_us([lambda w=w: library(w) for w in ws_t])
            runs = []
            for w in ws_t[1:]:  # cold weights, each run alone after the GPU idled
                torch.cuda.synchronize()
                torch.cuda._sleep(100_000)
                probe(w)
                torch.cuda.synchronize()
                runs.append(t.clone().cpu())
            a = torch.stack(runs)  # (runs, programs, FIELDS)
            start, end = a[..., 0].double(), a[..., 4].double()
            cycles = (a[..., 3] - a[..., 1]).double()
            ghz = float((cycles.sum() / (end - start).clamp(min=1).sum()))  # SM clocks per ns
            t0 = start.min(dim=1, keepdim=True).values
            phases = dict(
                span_us=quantiles((end.max(1).values - t0[:, 0]) / 1e3),
                start_after_first_us=quantiles((start - t0).flatten() / 1e3),
                loop_us=quantiles((a[..., 2] - a[..., 1]).double().flatten() / ghz / 1e3),
                tail_us=quantiles((a[..., 3] - a[..., 2]).double().flatten() / ghz / 1e3),
                end_after_first_start_us=quantiles((end - t0).flatten() / 1e3),
                programs_per_sm=float(a[0, :, 5].bincount().max()),
            )
            rec = dict(case=name, K=K, N=N, dtype=str(dtype), kept=kept, config=cfg, grid=list(grid), probe_us=probe_us,
                       library_us=library_us, clock_ghz=ghz, phases=phases)
            records.append(rec)
            print(f"{name:10s} kept {kept:4.2f}: harness {probe_us:5.1f} us (library {library_us:5.1f}), "
                  f"grid {grid}, {ghz:.2f} GHz, up to {phases['programs_per_sm']:.0f} programs an SM")
            for key in ("start_after_first_us", "loop_us", "tail_us", "end_after_first_start_us", "span_us"):
                q = phases[key]
                print(f"    {key:26s} p10 {q['p10']:5.2f}  p50 {q['p50']:5.2f}  p90 {q['p90']:5.2f}  max {q['max']:5.2f}")
        del ws_t
        torch.cuda.empty_cache()
    print(f"-> {bench.save_records('gemv_phases', dict(header, empty_graph_us=empty_us), records)}")


if __name__ == "__main__":
    main()
