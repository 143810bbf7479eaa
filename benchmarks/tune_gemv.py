"""Batch-1 sparse GEMV on this GPU: candidate kernels and tiles beside cuBLAS and TEAL's kernel.

    python benchmarks/tune_gemv.py --teal /path/to/TEAL/kernels/sparse_gemv.py [--quick]

The measurement behind the M = 1 dispatch rule of ``kernels/sparse_linear.py``.  For the
Llama-3-8B linears, the q/k/v and gate/up groups and the 5120x17920 GEMV of TEAL's
Figure 4 (fp16, batch 1), at 0-90 % sparsity, it times in one process and one harness
(``benchmarks/kernels.py``: CUDA graphs, rotated weight buffers, do_bench median):
cuBLAS, TEAL's kernel (FasterDecoding/TEAL ``kernels/sparse_gemv.py``, loaded from the
given path, never copied here; autotuned by its own autotuner before capture), the
launcher's dispatch, and the candidate configurations below.  Every output is checked
against the float64 reference first.  Writes ``kernels_<gpu>_tune.json`` to $OUT (else
benchmarks/results/) and prints, per case, the best candidate beside TEAL and the floor.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("wina_bench_kernels", os.path.join(HERE, "kernels.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # puts the source tree on sys.path
from kernels import reference, sparse_linear as sl  # noqa: E402

CASES = {  # name: (K, output sizes of the linears sharing x)
    "5120x17920": (5120, (17920,)),
    "4096x14336": (4096, (14336,)),
    "14336x4096": (14336, (4096,)),
    "4096x4096": (4096, (4096,)),
    "4096x1024": (4096, (1024,)),
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
}
DEFAULT_CASES = tuple(CASES)
CASES.update({  # one rank's shards of those linears, tensor parallel over 2 GPUs (--cases)
    "tp2_qkv": (4096, (2048, 512, 512)),
    "tp2_gate_up": (4096, (7168, 7168)),
    "tp2_2048x4096": (2048, (4096,)),
    "tp2_7168x4096": (7168, (4096,)),
})
SPARSITIES = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]


def case_weights(K: int, sizes, generator, dtype=torch.float16) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Rotated copies (``dtype``) of a case's W^T (K, sum sizes), enough that one pass over them
    leaves the L2 cache cold, and the (len(sizes), K) WINA scores of its linears."""
    N = sum(sizes)
    copies = min(16, max(bench.NBUF_MIN, -(-int(bench.ROTATE_BYTES) // (K * N * 2))))
    ws_t = [(torch.randn(K, N, device="cuda", generator=generator) * K**-0.5).to(dtype) for _ in range(copies)]
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    scores = torch.stack([ws_t[0][:, e - n:e].float().norm(dim=1) for e, n in zip(ends, sizes)])
    return ws_t, scores


def packed_cublas(x, ws_t, masks, sizes) -> float:
    """Time of cuBLAS on each linear's kept rows packed contiguous (x[kept] @ W^T[kept]):
    what a dense GEMV launch pays for the kept bytes alone, the reachable side of the
    floor (launch, ramp and tail included).  Packed once per rotated copy, outside the timing."""
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    kept = [m.nonzero().squeeze(1) for m in masks]
    xs = [x[:, idx].contiguous() for idx in kept]
    packed = [[w[idx, e - n:e].contiguous() for idx, e, n in zip(kept, ends, sizes)] for w in ws_t]
    us = bench.time_us([lambda p=p: [xk @ wk for xk, wk in zip(xs, p)] for p in packed])
    del packed
    return us


def check_and_time(rec: dict, name: str, fn, ws_t, ref, workspace, label: str) -> None:
    """Check ``fn`` (one call on a weight of ``ws_t``) against the float64 ``ref``, then time
    it over the rotated weights into ``rec["us"][name]``; one that fails (error, wrong result,
    workspace left dirty) is recorded in ``rec["err"]`` with the reason, never timed."""
    try:
        err = bench.rel_err(fn(ws_t[0]), ref)
        if not err < 2e-2:
            raise AssertionError(f"rel err {err}")
        rec["us"][name] = bench.time_us([lambda w=w: fn(w) for w in ws_t])
        rec["err"][name] = err
        assert not workspace.any(), "workspace left dirty"
    except Exception as e:  # a candidate that fails is recorded, never timed
        rec["err"][name] = f"{type(e).__name__}: {str(e)[:200]}"
        print(f"  {label} {name}: {rec['err'][name]}", flush=True)


def one_shot(block_k, block_n, warps, steps=1, reduce=2):
    """Masked GEMV whose programs each cover `steps` BLOCK_K-row steps (TEAL's shape: many
    short programs), split-K sums met by float32 atomics (2) or tickets (1)."""
    def cfg(K, sizes, s):
        return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=triton.cdiv(K, steps * block_k),
                    STAGES=min(steps, 3), REDUCE=reduce, num_warps=warps)
    return "gemv_masked", cfg


def looped(reduce, per_sm=2):
    """The masked GEMV as dispatched today (about per_sm programs per SM, each looping)."""
    def cfg(K, sizes, s):
        c = sl._gemv_masked_config(1, sum(sizes), K, torch.float16, bench.num_sms())
        tiles = sum(triton.cdiv(n, c["BLOCK_N"]) for n in sizes)
        split = max(1, min(triton.cdiv(per_sm * bench.num_sms(), tiles), K // 256, 32))
        return dict(c, SPLIT_K=split, REDUCE=reduce)
    return "gemv_masked", cfg


def compacted(times_split, reduce):
    def cfg(K, sizes, s):
        c = sl._gemv_config(1, sum(sizes), K, torch.float16, bench.num_sms())
        tiles = sum(triton.cdiv(n, c["BLOCK_N"]) for n in sizes)
        split = max(1, min(triton.cdiv(times_split * bench.num_sms(), tiles), K // 64, 128))
        return dict(c, SPLIT_K=split, REDUCE=reduce if split > 1 else 0)
    return "gemv", cfg


def masked(block_n, block_k, per_sm, stages=3, warps=4, reduce=1):
    """The looped masked GEMV with given tiles and about per_sm programs per SM (split-K
    by tickets when the output tiles alone do not fill the GPU that many times)."""
    def cfg(K, sizes, s):
        tiles = sum(triton.cdiv(n, block_n) for n in sizes)
        split = max(1, min(triton.cdiv(per_sm * bench.num_sms(), tiles), K // block_k, 64))
        return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=stages, REDUCE=reduce,
                    num_warps=warps)
    return "gemv_masked", cfg


def wide(path, block_n, rows, per_sm, reduce=1, split=None, vectors=1):
    """Wide, short tiles (ROW_SUM, as dispatched since session 16): block_n columns (2 * block_n
    contiguous bytes of each kept row, one 16-byte vector per thread, or ``vectors``), `rows` rows
    per step summed in the thread, the loads straight into registers one step ahead, bf16 read as
    int32 pairs; split-K to about per_sm programs per SM, or a fixed ``split``; masked loads
    (`gemv_masked`) or compacted rows (`gemv`).

    Session 12 (runs 9-10, ``kernels_h200_tune_run10_split_sweep.json``) swept fixed splits
    20-48 of the then 2048 x 8 tiles: the masked kernel took 1.3-1.8x longer whenever a program's
    K range was an odd number of its 8-row steps (K_PER_SPLIT not a multiple of 16).  The
    launcher now rounds that range to 16 channels, so a split runs as the split that range gives."""
    def cfg(K, sizes, s):
        tiles = sum(triton.cdiv(n, block_n) for n in sizes)
        fitted = max(1, min(triton.cdiv(per_sm * bench.num_sms(), tiles), K // (2 * rows), 128))
        c = dict(BLOCK_N=block_n, SPLIT_K=split or fitted, STAGES=1, REDUCE=reduce,
                 num_warps=block_n // (256 * vectors), ROW_SUM=True, UNPACK=True)
        c["BLOCK_K" if path == "gemv_masked" else "BLOCK_R"] = rows
        return c
    return path, cfg


# Run 1 (kernels_h200_tune_run1.json) also timed one-shot masked programs with float32
# atomics (os*, two*, four*): 1.5-5x slower than the looped kernel at every shape but
# 4096x1024, their time flat in sparsity (atomic-bound).  Run 2 (kernels_h200_tune_run2.json)
# timed a stream-K kernel (even work per program, masked or compacted body; sm*, sc*):
# never the best, 5-40 % behind.  Both are in git history (commit "Stream-K sparse GEMV").
CANDIDATES = {
    "dispatched": (None, None),
    "loop_r0": looped(0), "loop_r1": looped(1),
    "os256x32w4": one_shot(256, 32, 4),
    "cmp_r0": compacted(1, 0), "cmp2_r1": compacted(2, 1),
    # run 3: more, shorter programs (the loop is latency-bound: flat in sparsity on wide shapes)
    "loop4_r1": looped(1, 4), "loop8_r1": looped(1, 8),
    "m64x64p8": masked(64, 64, 8), "m128x64p8": masked(128, 64, 8), "m128x32p16": masked(128, 32, 16, 2),
    "m256x32p8w8": masked(256, 32, 8, 2, 8), "m64x128p4s4": masked(64, 128, 4, 4),
    "cmp4_r1": compacted(4, 1),
    # run 4 (session 8): x loaded by asynchronous copies.  With 128 threads and a 128-row step each
    # thread loads one fp16 of x, under cp.async's 4 bytes, so the load is synchronous and each
    # step waits for it before its weight rows can be issued; 2 warps or 256-row steps make it async.
    "m64x128p2w2": masked(64, 128, 2, 3, 2), "m64x128p4w2": masked(64, 128, 4, 3, 2),
    "m64x256p2": masked(64, 256, 2), "m32x256p2": masked(32, 256, 2), "m32x512p2": masked(32, 512, 2),
    # Also timed in run 4 and dropped: the compacted kernel with the kept x values written beside
    # the kept ids (async loads instead of a gather of x): slower everywhere (255 registers).
    "loop_r2": looped(2), "cmp2_r2": compacted(2, 2),
    # Sessions 11-15 timed wide, short tiles software-pipelined by Triton (wm*, wc*: 512-2048
    # columns, 8-32 rows, 2-5 stages, fixed splits 20-48; kernels_h200_tune_run5-10*.json).  Since
    # session 16 the wide tiles (ROW_SUM) load straight into registers one step ahead instead
    # (ncu: the pipelined ones spent 7-8 instructions per weight element); those candidates are
    # in git history.  p{m,c}{columns}r{rows}p{programs per SM}[v2]: masked or compacted, v2 with
    # two 16-byte vectors of each row per thread (216 registers; never ahead in session 16).
    **{f"p{kind}{n}r{r}p{p}": wide(path, n, r, p, reduce=2)
       for kind, path in (("m", "gemv_masked"), ("c", "gemv")) for n, r, p in
       ((2048, 8, 2), (2048, 8, 3), (1024, 8, 2), (1024, 8, 3), (1024, 8, 4), (512, 8, 4), (512, 8, 8),
        (1024, 16, 2),
        # session 17, for the tensor-parallel shards (the o shard ran 128 splits of 16 rows)
        (256, 8, 8), (256, 8, 16), (1024, 8, 8), (512, 16, 4))},
    **{f"p{kind}{n}r{r}p{p}v2": wide(path, n, r, p, reduce=2, vectors=2)
       for kind, path in (("m", "gemv_masked"), ("c", "gemv")) for n, r, p in
       ((1024, 8, 4), (1024, 8, 2), (2048, 8, 2), (512, 8, 8), (512, 8, 4))},
    **{f"pm512r8p{p}": wide("gemv_masked", 512, 8, p, reduce=2) for p in (6, 12, 16)},
    "pc512r8p8": wide("gemv", 512, 8, 8, reduce=2),
}
QUICK = ["dispatched", "loop_r1", "cmp2_r1"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teal", help="path to TEAL's kernels/sparse_gemv.py")
    ap.add_argument("--quick", action="store_true", help="5 candidates, 2 cases")
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--candidates", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--suffix", default="", help="appended to the result file name")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"],
                    help="of the weights and x (TEAL's kernel: float16 only)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="time every candidate this many times, interleaved; record the median and every round")
    ap.add_argument("--final", action="store_true",
                    help="the dispatched kernel only, beside cuBLAS and TEAL: kernels_<gpu>_dispatch.json and .png")
    args = ap.parse_args()
    teal = bench.load_teal(args.teal) if args.teal else None
    names = args.candidates.split(",") if args.candidates else (QUICK if args.quick else list(CANDIDATES))
    if args.final:
        names = ["dispatched"]
    cases = ["5120x17920", "qkv"] if args.quick else args.cases.split(",")
    sparsities = [float(v) for v in args.sparsities.split(",")]
    dtype = getattr(torch, args.dtype)
    bw = bench.copy_bandwidth()
    header = dict(bench.device_header(bw), dtype=args.dtype)
    out_path = os.path.join(bench.out_dir(), f"kernels_{bench.gpu_tag()}_{'dispatch' if args.final else 'tune'}{args.suffix}.json")
    print(f"{header['gpu']}  torch {torch.__version__}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s")
    records = []
    ws = torch.zeros(sl.workspace_size(max(sum(s) for _, s in CASES.values())), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    for case in cases:
        K, sizes = CASES[case]
        N = sum(sizes)
        ws_t, scores = case_weights(K, sizes, g, dtype)
        x = torch.randn(1, K, device="cuda", generator=g).to(dtype)
        dense = bench.time_us([lambda w=w: x @ w for w in ws_t])  # cuBLAS on W^T (K, N): as F.linear on W.t()
        dense_f = bench.time_us([lambda w=w: F.linear(x, w.t()) for w in ws_t])
        for s in sparsities:
            thr = [reference.importance(x, sc).quantile(s).item() if s > 0 else -1.0 for sc in scores]
            masks = [reference.threshold_mask(x, sc, t)[0] for sc, t in zip(scores, thr)]
            kept_bytes = sum(int(m.sum()) * n * 2 for m, n in zip(masks, sizes))
            floor = (kept_bytes + 4 * K + 2 * N) / bw * 1e6
            ref = reference.threshold_linear_group(x.double(), ws_t[0].t().double(), None, scores, thr, sizes)
            rec = dict(case=case, K=K, sizes=list(sizes), sparsity=s, floor_us=floor, cublas_us=dense,
                       cublas_flinear_us=dense_f, packed_cublas_us=packed_cublas(x, ws_t, masks, sizes), us={}, err={})
            group = (tuple(sizes), tuple(thr)) if len(sizes) > 1 else None
            score_arg = scores if group else scores[0]
            fns = {}
            for name in names:
                path, cfg_fn = CANDIDATES[name]
                cfg = cfg_fn(K, sizes, s) if cfg_fn else None

                def fn(w, path=path, cfg=cfg):
                    return sl._sparse_linear(x, w, None, score_arg, threshold=thr[0], group=group, path=path,
                                             config=cfg, sparsity_hint=s, workspace=ws)
                check_and_time(rec, name, fn, ws_t, ref, ws, f"{case} s={s}")
                fns[name] = fn
            if args.repeats > 1:  # more rounds, candidates interleaved so that a drifting clock meets them all
                rounds = {name: [us] for name, us in rec["us"].items()}
                for _ in range(args.repeats - 1):
                    for name in rounds:
                        rounds[name].append(bench.time_us([lambda w=w, fn=fns[name]: fn(w) for w in ws_t]))
                rec["us_rounds"] = rounds
                rec["us"] = {name: statistics.median(times) for name, times in rounds.items()}
            if teal is not None and dtype == torch.float16:
                tthr = [(x.abs().float().quantile(s).item() if s > 0 else -1.0)] * len(sizes)
                tmask = x.abs()[0] > tthr[0]
                tref = ws_t[0].t().double() @ (x[0].double() * tmask)
                sbin = int(s * 10)
                if case.endswith("qkv"):
                    tfn = lambda w: teal.qkv_gemv(x.view(1, 1, K), w.t(), *tthr, sbin, sizes[1])
                else:
                    tfn = lambda w: teal.splitk_sparse_gemv(x.view(1, 1, K), w.t(), tthr[0], sbin)
                y = tfn(ws_t[0])  # autotunes here, outside any capture
                rec["err"]["teal"] = bench.rel_err(y.view(-1), tref)
                rec["us"]["teal"] = bench.time_us([lambda w=w: tfn(w) for w in ws_t])
            records.append(rec)
            best = min(rec["us"].items(), key=lambda kv: kv[1] if kv[0] != "teal" else math.inf)
            t = rec["us"].get("teal")
            print(f"{case:10s} s={s:.2f} cublas {dense:6.1f} packed {rec['packed_cublas_us']:6.1f} floor {floor:6.1f} | teal {dense / t if t else 0:4.2f}x "
                  f"disp {dense / rec['us'].get('dispatched', math.inf):4.2f}x best {best[0]} "
                  f"{dense / best[1]:4.2f}x ({best[1]:6.1f} us) | " +
                  " ".join(f"{k}={v:.1f}" for k, v in sorted(rec["us"].items(), key=lambda kv: kv[1])[:6]),
                  flush=True)
            with open(out_path, "w") as f:
                json.dump(dict(header=header, records=records), f, indent=1)
        del ws_t
        torch.cuda.empty_cache()
    plot(records, header, out_path.replace(".json", ".png"))
    print(f"done in {time.time() - t0:.0f} s -> {out_path}")


def plot(records, header, path):
    """Speedup over cuBLAS by sparsity, one panel per case: the dispatched kernel, TEAL's,
    and the floor of the kept bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    cols = (len(cases) + 1) // 2
    fig, axes = plt.subplots(2, cols, figsize=(3 * cols, 6), squeeze=False)
    for ax in axes.flat[len(cases):]:
        ax.axis("off")
    for ax, case in zip(axes.flat, cases):
        rows = sorted((r for r in records if r["case"] == case), key=lambda r: r["sparsity"])
        s = [r["sparsity"] for r in rows]
        ax.plot(s, [r["cublas_us"] / r["floor_us"] for r in rows], "k--", lw=0.8, label="floor (kept bytes)")
        packed = [(r["sparsity"], r["cublas_us"] / r["packed_cublas_us"]) for r in rows if r.get("packed_cublas_us")]
        if packed:
            ax.plot(*zip(*packed), "k:", lw=0.8, label="cuBLAS on the kept rows, packed")
        for impl, style in [("dispatched", "o-"), ("teal", "s-")]:
            pts = [(r["sparsity"], r["cublas_us"] / r["us"][impl]) for r in rows if impl in r["us"]]
            if pts:
                ax.plot(*zip(*pts), style, ms=3, label="wina-fx" if impl == "dispatched" else "TEAL kernel")
        ax.set_title(case, fontsize=8)
        ax.set_xlabel("sparsity", fontsize=7)
        ax.set_ylim(0, 4)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("speedup over cuBLAS", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"batch 1, fp16, {header['gpu']}, torch {header['torch']}, triton {header['triton']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(path: str) -> None:
    """Markdown tables of a --final file: speedup over cuBLAS of wina-fx, TEAL and the floor."""
    data = json.load(open(path))
    h = data["header"]
    print(f"{h['gpu']}, torch {h['torch']}, Triton {h['triton']}, copy {h['copy_bandwidth_Bps'] / 1e12:.2f} TB/s, "
          "batch 1, fp16; speedup over cuBLAS\n")
    sparsities = sorted({r["sparsity"] for r in data["records"]})
    print("| case | impl | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |")
    print("|---|---|" + "---|" * len(sparsities))
    for case in dict.fromkeys(r["case"] for r in data["records"]):
        rows = {r["sparsity"]: r for r in data["records"] if r["case"] == case}
        for impl, label in [("dispatched", "wina-fx"), ("teal", "TEAL"), ("packed", "cuBLAS, kept rows packed"),
                            (None, "floor")]:
            if impl == "packed" and not any("packed_cublas_us" in r for r in rows.values()):
                continue  # files written before session 11
            cells = []
            for s in sparsities:
                r = rows[s]
                us = (r["floor_us"] if impl is None else r.get("packed_cublas_us") if impl == "packed"
                      else r["us"].get(impl))
                cells.append(f"{r['cublas_us'] / us:.2f}" if us else "-")
            name = f"{case} (cuBLAS {rows[sparsities[0]]['cublas_us']:.1f} us)" if impl == "dispatched" else ""
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:  # tune_gemv.py --table kernels_h200_dispatch.json
        table(sys.argv[2])
    else:
        main()
