"""Launch the dispatched one-token GEMV of a few Llama-3-8B linears, for Nsight Compute.

    for s in o qkv down gate_up; do
      ncu --clock-control none --kernel-name regex:_gemv --launch-skip 1 --launch-count 1 \\
          --section SpeedOfLight --section WarpStateStats --section LaunchStats --section Occupancy \\
          --section SourceCounters -o ncu_$s python benchmarks/ncu_gemv.py --shapes $s --repeats 2
      ncu -i ncu_$s.ncu-rep --page source --print-source sass --csv > sass_$s.csv   # per-instruction counts
    done

Each linear of ``--shapes`` (bf16, random weights, WINA scores, the threshold that drops
``--sparsity`` of the channels) is launched ``--repeats`` times as decode launches it
(``threshold_linear`` / ``threshold_linear_group`` with the calibrated sparsity as the hint,
one shared workspace), in shape order, then checked against the float64 reference.  One shape
a process, ``--launch-skip 1 --launch-count 1`` profiles its second launch.  Session 16
(benchmarks/NOTES.md) read from this that the GEMVs were bound by issuing 7-8 instructions
per weight element (``ncu_gemv_h200_session16_before.txt``), not by DRAM.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
from wina_fx.kernels import sparse_linear as sl  # noqa: E402

SHAPES = {"o": (4096, (4096,)), "qkv": (4096, (4096, 1024, 1024)), "down": (14336, (4096,)),
          "gate_up": (4096, (14336, 14336))}  # (K, output sizes of the linears sharing x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"from {', '.join(SHAPES)}")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--scale", type=int, default=1, help="divide every size by this (a plumbing check on the "
                                                               "CPU under TRITON_INTERPRET=1, with the interpreter "
                                                               "patch tests/test_kernels.py applies on import)")
    args = parser.parse_args()
    names = args.shapes.split(",")
    if set(names) - set(SHAPES):
        sys.exit(f"unknown shapes {sorted(set(names) - set(SHAPES))}; choose from {', '.join(SHAPES)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("ncu_gemv.py needs CUDA (or TRITON_INTERPRET=1 for a plumbing check)")
    gen = torch.Generator(device=device).manual_seed(0)
    workspace = torch.zeros(sl.workspace_size(28672), dtype=torch.int32, device=device)
    for name in names:
        K, sizes = SHAPES[name]
        K, sizes = K // args.scale, [n // args.scale for n in sizes]
        wt = (torch.randn(K, sum(sizes), device=device, generator=gen) * K ** -0.5).to(torch.bfloat16)
        x = torch.randn(1, K, device=device, generator=gen).to(torch.bfloat16)
        ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        scores = torch.stack([wt[:, e - n:e].float().norm(dim=1) for e, n in zip(ends, sizes)])
        importance = x.float().abs() * scores  # (linears, K)
        thresholds = [float(row.kthvalue(max(1, int(args.sparsity * K))).values) for row in importance]
        for _ in range(args.repeats):
            if len(sizes) == 1:
                out = sl.threshold_linear(x, wt, None, scores[0], thresholds[0], args.sparsity, workspace)
            else:
                out = sl.threshold_linear_group(x, wt, None, scores, thresholds, sizes, args.sparsity, workspace)
        keep = torch.cat([(imp > t).expand(n, K) for imp, t, n in zip(importance, thresholds, sizes)])  # (N, K)
        expected = ((x.double() * keep) * wt.t().double()).sum(-1)
        err = ((out.double()[0] - expected).norm() / expected.norm()).item()
        assert err < 2e-2, (name, err)
        print(f"{name} {K}x{sum(sizes)} at {args.sparsity:.0%}: {args.repeats} launches, rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
