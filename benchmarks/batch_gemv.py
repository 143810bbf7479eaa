"""A few tokens at once (sequences decoding together): sparse kernels beside cuBLAS.

    python benchmarks/batch_gemv.py [--batches 2,4,8,16] [--cases qkv,gate_up,...] [--dtype bfloat16]
                                    [--impls dispatched,x_mask_cublas]

Each token keeps its own channels (threshold rule, importance |x_i| * ||W[:, i]||); a kernel
can skip only the weight rows no token of the batch keeps.  For the cases of
``tune_gemv.py`` at 50 and 65 % sparsity it times, in one process and one harness
(``benchmarks/kernels.py``: CUDA graphs, rotated weight buffers), cuBLAS on x (x @ W^T, the
layout the sparse linears keep, and ``F.linear`` on W, the dense model's), the dispatched path
(at 2 tokens the masked GEMV with both tokens in each program, TOKENS 2; from 3 x * mask, then
cuBLAS), x * mask then cuBLAS (``x_mask_cublas``), the per-token GEMV (``gemv``: one program column
per token, each reading its own kept rows) and the union GEMV (``gemv_union``: the rows any
token keeps, read once: tensor-core tilings ``union_*``, and for 2-4 tokens register
tilings ``uwide_*``), beside the floor of the union's bytes.  Every
output is checked against the float64 reference first.  Writes
``kernels_<gpu>_batch.json`` and a PNG to $OUT (else benchmarks/results/).
``benchmarks/batch_union.py`` measures the union on a real model's masks.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("wina_tune_gemv", os.path.join(HERE, "tune_gemv.py"))
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)  # loads benchmarks/kernels.py, which puts the source tree on sys.path
bench = tune.bench
from kernels import reference, sparse_linear as sl  # noqa: E402

CASES = tune.CASES
SPARSITIES = (0.5, 0.65)


def union_tiles(block_n: int, block_r: int, per_sm: int, reduce: int = 1):
    def cfg(K, sizes, M):
        tiles = sum(triton.cdiv(n, block_n) for n in sizes)
        split = max(1, min(triton.cdiv(per_sm * bench.num_sms(), tiles), K // 256, 64))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_R=block_r, SPLIT_K=split, STAGES=3,
                    REDUCE=reduce if split > 1 else 0, num_warps=4)
    return cfg


def union_wide(block_n: int, rows: int, warps: int, per_sm: int):
    """The union kernel without tensor cores (ROW_SUM): wide, short tiles, every token's x in
    registers (BLOCK_M = the tokens rounded up to a power of two; 4 at most, registers), split-K
    by float32 atomics to about per_sm programs per SM."""
    def cfg(K, sizes, M):
        if M > 4:
            return None
        tiles = sum(triton.cdiv(n, block_n) for n in sizes)
        split = max(1, min(triton.cdiv(per_sm * bench.num_sms(), tiles), K // (2 * rows), 128))
        return dict(BLOCK_M=triton.next_power_of_2(M), BLOCK_N=block_n, BLOCK_R=rows, SPLIT_K=split, STAGES=3,
                    REDUCE=2 if split > 1 else 0, ROW_SUM=True, num_warps=warps)
    return cfg


def pair_tiles(block_n: int, rows: int, per_sm: int):
    """The masked GEMV with two tokens in each program (TOKENS 2) in the one-token wide tiles
    (``_wide_config``): block_n columns, `rows` rows a step, about per_sm programs per SM."""
    def cfg(K, sizes, M):
        if M != 2:
            return None
        _, tiles = sl._wide_config("gemv_masked", K, sizes, bench.num_sms(), block_n, rows, per_sm, 2)
        return {**tiles, "TOKENS": 2}
    return cfg


IMPLS = {  # name: (path, tiles or None for the launcher's own)
    "dispatched": (None, None),
    "x_mask_cublas": ("dense", None),
    "per_token": ("gemv", None),
    "union": ("gemv_union", None),
    "union_n64_r32_2sm": ("gemv_union", union_tiles(64, 32, 2)),
    "union_n128_r32_1sm": ("gemv_union", union_tiles(128, 32, 1)),
    "union_n64_r64_1sm": ("gemv_union", union_tiles(64, 64, 1)),
    "union_n32_r32_2sm": ("gemv_union", union_tiles(32, 32, 2)),
    # session 12: registers instead of tensor cores, 2-4 tokens (kernel_resources.py: 152 registers
    # at 2 tokens in 2048 x 8 tiles, 221 at 4; no spills)
    "uwide_n2048_r8_1sm": ("gemv_union", union_wide(2048, 8, 8, 1)),
    "uwide_n1024_r8_2sm": ("gemv_union", union_wide(1024, 8, 4, 2)),
    "uwide_n512_r16_3sm": ("gemv_union", union_wide(512, 16, 2, 3)),
    # session 18: two tokens in each masked program (127 registers at 8 rows: 8 programs of 2 warps an SM)
    **{f"pair_n{n}_r8_{p}sm": ("gemv_masked", pair_tiles(n, 8, p))
       for n, p in ((256, 16), (512, 4), (512, 8), (1024, 2), (1024, 4), (2048, 2))},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="2,4,8,16")
    ap.add_argument("--cases", default=",".join(tune.DEFAULT_CASES), help=f"of {', '.join(CASES)}")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"of {', '.join(IMPLS)}")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    dtype = getattr(torch, args.dtype)
    impls = {name: IMPLS[name] for name in args.impls.split(",")}
    bw = bench.copy_bandwidth()
    header = {**bench.device_header(bw), "dtype": args.dtype, "rule": "threshold, each token its own mask"}
    suffix = "" if dtype == torch.float16 else f"_{args.dtype}"
    out_path = os.path.join(bench.out_dir(), f"kernels_{bench.gpu_tag()}_batch{suffix}.json")
    print(f"{header['gpu']}  torch {torch.__version__}  triton {triton.__version__}  copy {bw / 1e12:.2f} TB/s")
    ws = torch.zeros(sl.workspace_size(max(sum(s) for _, s in CASES.values()), max(batches)), dtype=torch.int32,
                     device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    records, t0 = [], time.time()
    for case in args.cases.split(","):
        K, sizes = CASES[case]
        N = sum(sizes)
        ws_t, scores = tune.case_weights(K, sizes, g, dtype)
        weights = [w.t().contiguous() for w in ws_t]  # W (N, K), as the dense model holds it
        for M in batches:
            x = torch.randn(M, K, device="cuda", generator=g).to(dtype)
            cublas = bench.time_us([lambda w=w: x @ w for w in ws_t])
            cublas_linear = bench.time_us([lambda w=w: torch.nn.functional.linear(x, w) for w in weights])
            for s in SPARSITIES:
                thr = [reference.importance(x, sc).quantile(s).item() for sc in scores]
                union = [reference.threshold_mask(x, sc, t).any(dim=0) for sc, t in zip(scores, thr)]
                union_bytes = sum(int(u.sum()) * n * 2 for u, n in zip(union, sizes))
                floor = (union_bytes + 2 * M * K + 2 * M * N) / bw * 1e6
                ref = reference.threshold_linear_group(x.double(), ws_t[0].t().double(), None, scores, thr, sizes)
                group = (tuple(sizes), tuple(thr)) if len(sizes) > 1 else None
                score_arg = scores if group else scores[0]
                rec = dict(case=case, K=K, sizes=list(sizes), batch=M, sparsity=s, cublas_us=cublas,
                           cublas_linear_us=cublas_linear, floor_us=floor, union_kept=union_bytes / (K * N * 2),
                           us={}, err={})
                for name, (path, tiles) in impls.items():
                    cfg = tiles(K, sizes, M) if tiles else None
                    if tiles and cfg is None:  # not for this many tokens
                        continue

                    def fn(w, path=path, cfg=cfg):
                        return sl._sparse_linear(x, w, None, score_arg, threshold=thr[0], group=group, path=path,
                                                 config=cfg, sparsity_hint=s, workspace=ws)
                    tune.check_and_time(rec, name, fn, ws_t, ref, ws, f"{case} M={M} s={s}")
                records.append(rec)
                print(f"{case:10s} M={M:2d} s={s:.2f} union kept {rec['union_kept']:.3f} cublas {cublas:6.1f} "
                      f"F.linear {cublas_linear:6.1f} floor {floor:6.1f} | "
                      + " ".join(f"{k} {v:6.1f} us {cublas / v:4.2f}x" for k, v in rec["us"].items()), flush=True)
                with open(out_path, "w") as f:
                    json.dump(dict(header=header, records=records), f, indent=1)
        del ws_t, weights
        torch.cuda.empty_cache()
    plot(records, header, out_path.replace(".json", ".png"))
    print(f"done in {time.time() - t0:.0f} s -> {out_path}")


def plot(records, header, path) -> None:
    """Speedup over cuBLAS by batch size at 50 %, one panel per case: dispatched, per-token,
    the best union tiling, and the floor of the union's bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in records))
    fig, axes = plt.subplots(1, len(cases), figsize=(2.6 * len(cases), 2.8), squeeze=False)
    for ax, case in zip(axes[0], cases):
        rows = sorted((r for r in records if r["case"] == case and r["sparsity"] == 0.5), key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        ax.plot(batches, [r["cublas_us"] / r["floor_us"] for r in rows], "k--", lw=0.8, label="floor (union)")
        for label, pick in [("dispatched", lambda us: us.get("dispatched")),
                            ("per-token GEMV", lambda us: us.get("per_token")),
                            ("union GEMV, tensor cores (best tiling)",
                             lambda us: min((v for k, v in us.items() if k.startswith("union")), default=None)),
                            ("union GEMV, registers (best tiling)",
                             lambda us: min((v for k, v in us.items() if k.startswith("uwide")), default=None))]:
            pts = [(r["batch"], r["cublas_us"] / pick(r["us"])) for r in rows if pick(r["us"])]
            if pts:
                ax.plot(*zip(*pts), "o-", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(case, fontsize=8)
        ax.set_xlabel("tokens", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("speedup over cuBLAS, 50 %", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"{header['dtype']}, {header['gpu']}, torch {header['torch']}, triton {header['triton']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
