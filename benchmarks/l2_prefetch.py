"""Does a sparse GEMV gain from finding its weight in L2, streamed there beside the attention glue?

    python benchmarks/l2_prefetch.py [--shapes o,qkv] [--sparsity 0.5] [--glue 10]

The session-14 timeline (benchmarks/NOTES.md) shows about 15 us of small kernels (rotary,
cache writes, attention) between the q/k/v GEMV and o_proj, with DRAM nearly idle, and the o
GEMV latency-bound at 1.8 TB/s.  This times, per shape, one CUDA graph of ``--glue`` small
stand-in kernels followed by the dispatched threshold GEMV (bf16, M = 1), after an L2 flush:

* ``cold``: as in decode today;
* ``warm``: the weight read into L2 after the flush, untimed (the most L2 residency can give);
* ``side``: the weight streamed into L2 by a kernel on a second stream, forked before the
  glue and joined after the GEMV, so it runs beside the glue.

Measured on an H200 (session 15, ``results/l2_prefetch_NVIDIA_H200.{json,log}``): even ``warm``
saves at most 4 us, and next to nothing on o_proj; ``side`` costs 2-31 us.  That run also
timed ``chain`` (the linear before, then the glue, then the GEMV) against ``chain_warm`` (the
linear before prefetching this weight into L2 by ``cp.async.bulk.prefetch.L2`` as its
programs finished): 1.1-7.6 us slower.  That prefetch was removed; its code is commit 8c7a48b.

Each figure is (time of the untimed part + graph) - (time of the untimed part alone), over
many replays; the untimed part is the flush, and for ``warm`` the read into L2.  Writes
``l2_prefetch_<gpu>.json`` to $OUT (else benchmarks/results/).  Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
from wina_fx.kernels import sparse_linear as sl  # noqa: E402

SHAPES = {"o": (4096, 4096), "qkv": (4096, 6144), "o_tp2": (2048, 4096), "qkv_tp2": (4096, 3072),
          "down": (14336, 4096), "down_tp2": (7168, 4096)}  # (K, N)
CASES = ("cold", "warm", "side")


@triton.jit
def _read_into_l2(w_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    """Read w (n elements) and keep it in L2 (evict_last); one float per program reaches sink,
    so the loads are not removed."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    tl.store(sink_ptr + tl.program_id(0), tl.sum(w.to(tl.float32), axis=0))


def read_into_l2(w: torch.Tensor, sink: torch.Tensor, block: int = 8192) -> None:
    _read_into_l2[(triton.cdiv(w.numel(), block),)](w, sink, w.numel(), BLOCK=block, num_warps=8)


def step(case: str, glue: torch.Tensor, steps: int, x, wt, score, threshold, sparsity, workspace, sink, side):
    """Glue kernels, then the GEMV; with ``case`` "side", the weight into L2 beside the glue."""
    main = torch.cuda.current_stream()
    if case == "side":
        side.wait_stream(main)
        with torch.cuda.stream(side):
            read_into_l2(wt, sink)
    for _ in range(steps):  # stand-ins for rotary, cache writes, attention: tiny dependent kernels
        glue.mul_(1.0001).add_(1e-4)
    out = sl.threshold_linear(x, wt, None, score, threshold, sparsity_hint=sparsity, workspace=workspace)
    if case == "side":
        main.wait_stream(side)
    return out


def timed(fn, replays: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays  # us


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="o,qkv,o_tp2,qkv_tp2", help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--glue", default="5", help="stand-in glue steps (two kernels each), comma-separated")
    parser.add_argument("--replays", type=int, default=200)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("l2_prefetch.py needs CUDA")
    glues = [int(g) for g in args.glue.split(",")]
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        sys.exit(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")

    device = torch.device("cuda")
    flush_buf = torch.empty(512 << 20, dtype=torch.uint8, device=device)  # 512 MB, ten times L2
    glue = torch.zeros(4096, device=device)
    sink = torch.empty(1 << 16, device=device)
    side = torch.cuda.Stream()
    flush = torch.cuda.CUDAGraph()
    with torch.cuda.graph(flush):
        flush_buf.add_(1)
    records = []

    def linear(name: str):
        """(x, W^T, score, threshold) of a random bf16 linear at the asked sparsity."""
        K, N = SHAPES[name]
        gen = torch.Generator(device=device).manual_seed(0)
        wt = (torch.randn(K, N, device=device, generator=gen) * 0.02).to(torch.bfloat16)
        x = torch.randn(1, K, device=device, generator=gen).to(torch.bfloat16)
        score = wt.float().norm(dim=1)
        importance = x.float().abs()[0] * score
        return x, wt, score, float(importance.kthvalue(int(args.sparsity * K)).values)

    for name, glue_steps in ((n, g) for n in args.shapes.split(",") for g in glues):
        K, N = SHAPES[name]
        x, wt, score, threshold = linear(name)
        importance = x.float().abs()[0] * score
        workspace = torch.zeros(sl.workspace_size(N), dtype=torch.int32, device=device)
        expected = (x.float() * (importance > threshold)) @ wt.float()
        flush_then_read = torch.cuda.CUDAGraph()  # the untimed part of "warm"
        with torch.cuda.graph(flush_then_read):
            flush_buf.add_(1)
            read_into_l2(wt, sink)
        times = {}
        for case in CASES:
            graph = torch.cuda.CUDAGraph()
            args_ = (glue, glue_steps, x, wt, score, threshold, args.sparsity, workspace, sink, side)
            step(case, *args_)  # compile and warm up outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                out = step(case, *args_)
            graph.replay()
            torch.cuda.synchronize()
            err = ((out.float() - expected).norm() / expected.norm()).item()
            assert err < 2e-2, (name, case, err)

            untimed = flush_then_read if case == "warm" else flush

            def both():
                untimed.replay()
                graph.replay()

            times[case] = timed(both, args.replays) - timed(untimed.replay, args.replays)
        floor = K * N * 2 * (1 - args.sparsity) / 4.26e12 * 1e6
        records.append({"shape": name, "K": K, "N": N, "sparsity": args.sparsity,
                        "glue_steps": glue_steps, **{f"{c}_us": t for c, t in times.items()}, "floor_us": floor})
        print(f"{name} {K}x{N} at {args.sparsity:.0%}, {glue_steps} glue steps: glue + GEMV cold {times['cold']:.1f} "
              f"us, warm {times['warm']:.1f}, side {times['side']:.1f} (copy floor of the kept bytes {floor:.1f})",
              flush=True)

    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    header = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "dtype": "bfloat16",
              "replays": args.replays}
    with open(os.path.join(out_dir, f"l2_prefetch_{gpu}.json"), "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
