"""Variants of the masked wide GEMV's loop beside the dispatched kernel, in one process.

    python benchmarks/masked_variants.py [--cases o,down,5120x17920] [--sparsities 0.4,0.5,0.65]

Session 17's phase probe (``gemv_phases.py``) found the dispatched masked tiles' loops at the
copy rate for the median program, but the slowest programs 1.4-1.5x longer, with the same
spread when nothing is kept at all.  Each step's keep decision waits for that step's x and
score loads, which the loop issues in the middle of the step before (about 100 instructions
ahead: the SASS of the 512 x 8 tile), and in a decode step the scores come from DRAM: the
7.5 GB of weights a token reads stream through L2 with the default policy.  The variants
change only where x and the scores come from:

* ``copy``: the loop as dispatched (``_masked_prefetched``'s order), in this script's kernel:
  its time against the library's shows what the harness kernel itself costs;
* ``scores_l2``: the score loads marked ``evict_last``, so that they stay in L2;
* ``ahead2``: x and the scores loaded two steps ahead of their keep decision instead of one;
* ``both``;
* ``bitmask``: the keep decisions of 32 channels at a time, one channel a thread, folded into
  one int32 that every thread holds, a word (4 steps of 8 rows) ahead of the weight loads that
  use it; each step then loads only its weight rows and its x (its program's K range rounded
  to 32 channels, so its split can differ from the dispatch's by a few programs).

Same tiles, split and float32-atomic split-K sum as the dispatch picks (``_gemv_choice``),
single linears, programmatic dependent launch as dispatched; every output is checked against
the float64 reference before it is timed.  GPU only (the PDL instructions are inline PTX).
Writes ``masked_variants_<gpu>.json`` to $OUT (else benchmarks/results/).
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

CASES = {"o": (4096, 4096, torch.bfloat16), "down": (14336, 4096, torch.bfloat16),
         "5120x17920": (5120, 17920, torch.float16)}  # (K, N, dtype)
VARIANTS = {  # name: (EVICT_LAST, AHEAD2, BITMASK)
    "copy": (False, False, False), "scores_l2": (True, False, False), "ahead2": (False, True, False),
    "both": (True, True, False), "bitmask": (False, False, True),
}


@triton.jit
def _x_and_scores(x_row, score_ptr, offs, k_hi, EVICT_LAST: tl.constexpr):
    """x (as float32) and the scores of channels offs; zeros past k_hi."""
    valid = offs < k_hi
    xf = tl.load(x_row + offs, mask=valid, other=0.0).to(tl.float32)
    if EVICT_LAST:
        score = tl.load(score_ptr + offs, mask=valid, other=0.0, eviction_policy="evict_last")
    else:
        score = tl.load(score_ptr + offs, mask=valid, other=0.0)
    return xf, score


@triton.jit
def _variant_loop(x_row, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, n_end, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UNPACK: tl.constexpr, EVICT_LAST: tl.constexpr, AHEAD2: tl.constexpr):
    """_masked_prefetched (threshold rule) with the variant's x and score loads."""
    acc_a, acc_b = kern._row_sum_accumulators(BLOCK_N, UNPACK)
    offs = k_lo + tl.arange(0, BLOCK_K)
    xf, score = _x_and_scores(x_row, score_ptr, offs, k_hi, EVICT_LAST)
    keep = kern._keep(xf, score, offs < k_hi, threshold, 0)
    w = kern._row_tile(wt_ptr, offs, keep, stride_wk, col0, n_end, BLOCK_N, UNPACK)
    xk = tl.where(keep, xf, 0.0)
    offs += BLOCK_K
    xf_next, score_next = _x_and_scores(x_row, score_ptr, offs, k_hi, EVICT_LAST)
    if AHEAD2:
        xf_after, score_after = _x_and_scores(x_row, score_ptr, offs + BLOCK_K, k_hi, EVICT_LAST)
    for _ in range(k_lo + BLOCK_K, k_hi, BLOCK_K):
        keep_next = kern._keep(xf_next, score_next, offs < k_hi, threshold, 0)
        w_next = kern._row_tile(wt_ptr, offs, keep_next, stride_wk, col0, n_end, BLOCK_N, UNPACK)
        acc_a, acc_b = kern._rows_dot(acc_a, acc_b, w, xk, UNPACK)
        xk, w = tl.where(keep_next, xf_next, 0.0), w_next
        offs += BLOCK_K
        if AHEAD2:
            xf_next, score_next = xf_after, score_after
            xf_after, score_after = _x_and_scores(x_row, score_ptr, offs + BLOCK_K, k_hi, EVICT_LAST)
        else:
            xf_next, score_next = _x_and_scores(x_row, score_ptr, offs, k_hi, EVICT_LAST)
    return kern._in_column_order(*kern._rows_dot(acc_a, acc_b, w, xk, UNPACK), UNPACK)


@triton.jit
def _keep_word(x_row, score_ptr, c0, k_hi, threshold):
    """The keep decisions of channels c0 .. c0 + 31 as one int32 (bit r: channel c0 + r), the same
    in every thread; channels from k_hi are dropped."""
    offs = c0 + tl.arange(0, 32)
    xf, score = _x_and_scores(x_row, score_ptr, offs, k_hi, False)
    keep = kern._keep(xf, score, offs < k_hi, threshold, 0)
    return tl.sum(keep.to(tl.int32) << tl.arange(0, 32), axis=0)


@triton.jit
def _bitmask_loop(x_row, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, n_end, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UNPACK: tl.constexpr):
    """_masked_prefetched (threshold rule) with the keep decisions a 32-channel word ahead (see
    the module docstring); k_hi - k_lo a multiple of 32, BLOCK_K 8 or 16."""
    STEPS: tl.constexpr = 32 // BLOCK_K
    acc_a, acc_b = kern._row_sum_accumulators(BLOCK_N, UNPACK)
    rows = tl.arange(0, BLOCK_K)
    word = _keep_word(x_row, score_ptr, k_lo, k_hi, threshold)
    word_next = _keep_word(x_row, score_ptr, k_lo + 32, k_hi, threshold)
    w = kern._row_tile(wt_ptr, k_lo + rows, ((word >> rows) & 1) != 0, stride_wk, col0, n_end, BLOCK_N, UNPACK)
    x_cur = tl.load(x_row + k_lo + rows, mask=k_lo + rows < k_hi, other=0.0)
    for c in range(k_lo, k_hi, 32):
        for i in tl.static_range(STEPS):
            if i + 1 < STEPS:
                bits_next = word >> ((i + 1) * BLOCK_K)
                offs_next = c + (i + 1) * BLOCK_K + rows
            else:
                bits_next = word_next
                offs_next = c + 32 + rows
            w_next = kern._row_tile(wt_ptr, offs_next, ((bits_next >> rows) & 1) != 0, stride_wk, col0, n_end,
                                    BLOCK_N, UNPACK)
            x_next = tl.load(x_row + offs_next, mask=offs_next < k_hi, other=0.0)
            keep = ((word >> (i * BLOCK_K + rows)) & 1) != 0
            acc_a, acc_b = kern._rows_dot(acc_a, acc_b, w, tl.where(keep, x_cur.to(tl.float32), 0.0), UNPACK)
            w, x_cur = w_next, x_next
        word = word_next
        word_next = _keep_word(x_row, score_ptr, c + 64, k_hi, threshold)
    return kern._in_column_order(acc_a, acc_b, UNPACK)


@triton.jit
def _variant_kernel(x_ptr, wt_ptr, score_ptr, out_ptr, cnt_ptr, N, K, stride_wk, threshold, K_PER_SPLIT,
                    SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UNPACK: tl.constexpr,
                    EVICT_LAST: tl.constexpr, AHEAD2: tl.constexpr, BITMASK: tl.constexpr):
    """_gemv_masked_kernel's wide path for one linear and one token (PDL, REDUCE 2) around the variant loop."""
    pid_n = tl.program_id(0) + kern._launch_dependents()
    pid_k = tl.program_id(1)
    m = kern._wait_for_prior()
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    col0 = pid_n * BLOCK_N
    if BITMASK:
        acc = _bitmask_loop(x_ptr + m * K, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, N, BLOCK_N,
                            BLOCK_K, UNPACK)
    else:
        acc = _variant_loop(x_ptr + m * K, score_ptr, wt_ptr, stride_wk, k_lo, k_hi, threshold, col0, N, BLOCK_N,
                            BLOCK_K, UNPACK, EVICT_LAST, AHEAD2)
    kern._finish(acc, m + tl.arange(0, 1), col0 + tl.arange(0, BLOCK_N), 1, N, out_ptr, N, out_ptr, out_ptr,
                 cnt_ptr, pid_n, tl.num_programs(0), pid_k, SPLIT_K, False, 2, N)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="o,down,5120x17920", help=f"of {', '.join(CASES)}")
    ap.add_argument("--sparsities", default="0.4,0.5,0.65")
    args = ap.parse_args()
    if set(args.cases.split(",")) - set(CASES):
        ap.error(f"unknown cases {sorted(set(args.cases.split(',')) - set(CASES))}; choose from {', '.join(CASES)}")
    bw = bench.copy_bandwidth()
    header = dict(bench.device_header(bw), variants=list(VARIANTS))
    print(f"{header['gpu']}  torch {torch.__version__}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s")
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = torch.zeros(sl.workspace_size(17920), dtype=torch.int32, device="cuda")
    records = []
    for name in args.cases.split(","):
        K, N, dtype = CASES[name]
        ws_t, scores = tune.case_weights(K, (N,), g, dtype)
        x = torch.randn(1, K, device="cuda", generator=g).to(dtype)
        for sparsity in [float(v) for v in args.sparsities.split(",")]:
            path, cfg = sl._gemv_choice(N, K, bench.num_sms(), sparsity)
            if path != "gemv_masked":
                print(f"{name} at {sparsity}: the dispatch picks {path}; skipped (the variants are masked tiles)")
                continue
            thr = reference.importance(x, scores[0]).float().quantile(sparsity).item()
            k_per, split = sl.k_ranges(path, K, cfg)
            grid = (triton.cdiv(N, cfg["BLOCK_N"]), split)
            out = torch.empty(1, N, device="cuda", dtype=dtype)
            ref = reference.threshold_linear(x.double(), ws_t[0].t().double(), None, scores[0], thr)
            fns = {"dispatched": lambda w: sl._sparse_linear(x, w, None, scores[0], threshold=thr, path=path,
                                                             config=cfg, sparsity_hint=sparsity, workspace=ws)}
            for variant, (evict_last, ahead2, bitmask) in VARIANTS.items():
                per = triton.cdiv(k_per, 32) * 32 if bitmask else k_per
                launch = (grid[0], triton.cdiv(K, per))

                def fn(w, evict_last=evict_last, ahead2=ahead2, bitmask=bitmask, per=per, launch=launch):
                    _variant_kernel[launch](x, w, scores[0], out, ws[:launch[0] + N], N, K, w.stride(0), thr, per,
                                            SPLIT_K=launch[1], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                                            UNPACK=dtype == torch.bfloat16, EVICT_LAST=evict_last, AHEAD2=ahead2,
                                            BITMASK=bitmask, num_warps=cfg["num_warps"])
                    return out
                fns[variant] = fn
            rec = dict(case=name, K=K, N=N, dtype=str(dtype), sparsity=sparsity, config=cfg, grid=list(grid), us={},
                       floor_us=int(reference.threshold_mask(x, scores[0], thr).sum()) * N * dtype.itemsize / bw * 1e6)
            for variant, fn in fns.items():
                err = bench.rel_err(fn(ws_t[0]), ref)
                assert err < 2e-2 and not ws.any(), (name, sparsity, variant, err)
                rec["us"][variant] = bench.time_us([lambda w=w, fn=fn: fn(w) for w in ws_t])
            records.append(rec)
            print(f"{name:10s} s={sparsity:.2f} floor {rec['floor_us']:5.1f} | " +
                  " ".join(f"{k} {v:5.1f}" for k, v in rec["us"].items()), flush=True)
        del ws_t
        torch.cuda.empty_cache()
    print(f"-> {bench.save_records('masked_variants', header, records)}")


if __name__ == "__main__":
    main()
