"""Plot helper: latency vs sparsity, one panel per batch size, from a kernels_<gpu>.json.

    python benchmarks/plot.py benchmarks/results/kernels_h100.json [--K 5120 --N 17920 --dtype float16]
"""
from __future__ import annotations

import argparse
import json

STYLE = {  # impl -> (label, matplotlib format)
    "dense": ("dense cuBLAS (F.linear)", "k-o"),
    "floor": ("bandwidth floor", "k:"),
    "wina_threshold": ("wina threshold, dispatched", "C0-s"),
    "wina_masked": ("wina masked-load GEMV (TEAL-style)", "C2--v"),
    "wina_compact": ("wina compacted-rows GEMV", "C4--x"),
    "wina_topk": ("wina top-k", "C1-^"),
    "dense_kn": ("cuBLAS on the (K, N) weight", "k--"),
}


def plot(data: dict, path: str, K: int, N: int, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in data["records"] if r["K"] == K and r["N"] == N and r["dtype"] == dtype and "us" in r]
    batches = sorted({r["batch"] for r in recs})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rs = [r for r in recs if r["batch"] == batch]
        for impl, (label, fmt) in STYLE.items():
            if impl == "floor":
                pts = sorted({(r["sparsity"], r["floor_us"]) for r in rs if r["impl"] == "wina_threshold"})
            else:
                pts = sorted((r["sparsity"], r["us"]) for r in rs if r["impl"] == impl)
            if pts:
                ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], fmt, label=label, ms=4)
        ax.set_title(f"{dtype} K={K} N={N} batch {batch}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("latency (us)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{data['header']['gpu']}: wina sparse linear vs cuBLAS (do_bench median of CUDA-graph replays, "
                 "weights rotated).  Dispatched: M=1 masked GEMV (cuBLAS at 0 %), M>1 mask kernel + cuBLAS", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--K", type=int, default=5120)
    ap.add_argument("--N", type=int, default=17920)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    with open(a.json) as f:
        d = json.load(f)
    plot(d, a.out or a.json.replace(".json", ".png"), a.K, a.N, a.dtype)
