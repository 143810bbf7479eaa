"""Fixed cost and streaming rate of the dispatched one-token GEMV, by a fit over kept fractions.

    python benchmarks/gemv_fixed_cost.py [--cases o,qkv,down,gate_up] [--hint 0.5]

With the kernel and tiles that the dispatch picks for the calibrated sparsity ``--hint``
held fixed, the threshold is moved so that the kernel keeps 0, 10, 25, 50, 75 and 100 % of
the input channels.  Its time against the weight bytes it reads is nearly a line:
time = fixed + bytes / rate.  The intercept is what a launch costs whatever it reads
(ramp-up, the x loads and keep decisions, the split-K sums, the tail); the slope is how fast
its programs stream once they run.  The same fit for cuBLAS on the kept rows packed
contiguous, and for a graph of one empty kernel (the harness), sit beside it, from the
same process and timer (``benchmarks/kernels.py``: CUDA graphs over rotated weights).
Why: the small GEMVs (o, q/k/v) lose 5-6 us each against their copy floor and take the
same time with their weight in L2 (benchmarks/NOTES.md, session 15); the fit separates a
fixed cost from a slow stream.  ``--variants`` adds the same kernel with one thing changed:

* ``split1``: no split-K (one program per output tile: no atomics, no last-program sum);
* ``half_split``: half the splits (half the programs, each with twice the rows);
* ``tickets``: split-K partials stored, then summed in a fixed order by the last program of
  each tile (REDUCE 1) instead of float32 atomics: every dispatched GEMV issues about
  programs x BLOCK_N = 0.54 M atomic adds, 128 onto each output of o, which may be what
  its fixed cost is made of (session 16);
* ``two_launches``: partials stored, summed by a second kernel (REDUCE 0).

Writes ``gemv_fixed_cost_<gpu>.json`` to $OUT (else benchmarks/results/).
"""
from __future__ import annotations

import argparse
import importlib.util
import os

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("wina_tune_gemv", os.path.join(HERE, "tune_gemv.py"))
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)  # loads benchmarks/kernels.py, which puts the source tree on sys.path
bench = tune.bench
from kernels import reference, sparse_linear as sl  # noqa: E402

CASES = {  # name: (K, output sizes of the linears sharing x, dtype)
    "o": (4096, (4096,), torch.bfloat16),
    "qkv": (4096, (4096, 1024, 1024), torch.bfloat16),
    "down": (14336, (4096,), torch.bfloat16),
    "gate_up": (4096, (14336, 14336), torch.bfloat16),
    "5120x17920": (5120, (17920,), torch.float16),
}
KEPT = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0]
VARIANTS = {  # name: the dispatched config -> the variant's (see the module docstring)
    "dispatched": lambda cfg: cfg,
    "split1": lambda cfg: dict(cfg, SPLIT_K=1),
    "half_split": lambda cfg: dict(cfg, SPLIT_K=max(1, cfg["SPLIT_K"] // 2)),
    "tickets": lambda cfg: dict(cfg, REDUCE=1),
    "two_launches": lambda cfg: dict(cfg, REDUCE=0),
}


def fit(bytes_, us) -> tuple[float, float]:
    """Least-squares line us = fixed + bytes / rate: (fixed us, rate in TB/s)."""
    b = torch.tensor(bytes_, dtype=torch.float64)
    t = torch.tensor(us, dtype=torch.float64)
    A = torch.stack([torch.ones_like(b), b], 1)
    fixed, slope = torch.linalg.lstsq(A, t[:, None]).solution[:, 0].tolist()
    return fixed, (1e-6 / slope if slope > 0 else float("inf"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="o,qkv,down,gate_up,5120x17920", help=f"of {', '.join(CASES)}")
    ap.add_argument("--hint", type=float, default=0.5, help="calibrated sparsity that picks kernel and tiles")
    ap.add_argument("--variants", default="dispatched,split1", help=f"of {', '.join(VARIANTS)}")
    args = ap.parse_args()
    for given, valid in ((args.variants, VARIANTS), (args.cases, CASES)):
        if set(given.split(",")) - set(valid):
            ap.error(f"unknown {sorted(set(given.split(',')) - set(valid))}; choose from {', '.join(valid)}")
    bw = bench.copy_bandwidth()
    header = dict(bench.device_header(bw), hint=args.hint, kept=KEPT)
    print(f"{header['gpu']}  torch {torch.__version__}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s")
    ws = torch.zeros(sl.workspace_size(28672), dtype=torch.int32, device="cuda")
    empty_us = bench.empty_graph_us()
    print(f"graph of one empty kernel: {empty_us:.2f} us")
    g = torch.Generator(device="cuda").manual_seed(0)
    records = []
    for name in args.cases.split(","):
        K, sizes, dtype = CASES[name]
        N = sum(sizes)
        ws_t, scores = tune.case_weights(K, sizes, g, dtype)
        x = torch.randn(1, K, device="cuda", generator=g).to(dtype)
        group = len(sizes) > 1
        path, cfg = sl._gemv_choice(N, K, bench.num_sms(), args.hint, tuple(sizes) if group else None)
        configs = {name: change(cfg) for name, change in VARIANTS.items()}
        rec = dict(case=name, K=K, sizes=list(sizes), dtype=str(dtype), path=path, config=cfg, points=[])
        for kept in KEPT:
            drop = 1.0 - kept
            thr = [float("inf") if kept == 0 else
                   reference.importance(x, sc).float().quantile(drop).item() if drop > 0 else -1.0 for sc in scores]
            masks = [reference.threshold_mask(x, sc, t)[0] for sc, t in zip(scores, thr)]
            kept_bytes = sum(int(m.sum()) * n * dtype.itemsize for m, n in zip(masks, sizes))
            ref = reference.threshold_linear_group(x.double(), ws_t[0].t().double(), None, scores, thr, sizes)
            point = dict(kept=kept, bytes=kept_bytes, floor_us=kept_bytes / bw * 1e6, us={})
            for variant in args.variants.split(","):
                def fn(w, c=configs[variant]):
                    return sl._sparse_linear(x, w, None, scores if group else scores[0], threshold=thr[0],
                                             group=(tuple(sizes), tuple(thr)) if group else None, path=path,
                                             config=c, sparsity_hint=args.hint, workspace=ws)
                out = fn(ws_t[0])
                err = bench.rel_err(out, ref) if kept > 0 else float(out.abs().max())
                assert err < 2e-2, (name, variant, kept, err)
                point["us"][variant] = bench.time_us([lambda w=w: fn(w) for w in ws_t])
            if kept > 0:  # cuBLAS on the kept rows packed contiguous, one launch per linear
                point["us"]["cublas_packed"] = tune.packed_cublas(x, ws_t, masks, sizes)
            rec["points"].append(point)
            print(f"{name:10s} kept {kept:4.2f} {kept_bytes / 1e6:6.1f} MB floor {point['floor_us']:5.1f} | " +
                  " ".join(f"{k} {v:6.1f}" for k, v in point["us"].items()), flush=True)
        rec["fit"] = {}
        for variant in args.variants.split(",") + ["cublas_packed"]:
            pts = [(p["bytes"], p["us"][variant]) for p in rec["points"] if variant in p["us"]]
            fixed, rate = fit(*zip(*pts))
            rec["fit"][variant] = dict(fixed_us=fixed, rate_TBps=rate)
            print(f"{name:10s} {variant:14s} fixed {fixed:5.1f} us  stream {rate:4.2f} TB/s "
                  f"({path} {', '.join(f'{k}={v}' for k, v in cfg.items())})", flush=True)
        records.append(rec)
        del ws_t
        torch.cuda.empty_cache()
    print(f"-> {bench.save_records('gemv_fixed_cost', dict(header, empty_graph_us=empty_us), records)}")


if __name__ == "__main__":
    main()
