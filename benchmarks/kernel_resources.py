"""Registers, spills, shared memory and main-loop instructions of a GEMV configuration on a
Hopper GPU, without one.

    python benchmarks/kernel_resources.py                      # the dispatched wide tiles and older ones
    python benchmarks/kernel_resources.py --path gemv --block-n 1024 --rows 8 --warps 4 --stages 1

Triton compiles for a target it is told about (sm_90 here) without a GPU, and ships the
``cuobjdump`` that reads the cubin's resource usage (spilled registers show as a stack frame, STACK, of kilobytes).
Occupancy follows from it: programs
per SM = min(65536 / (registers x threads), 228 KB / shared memory), which decides how
many of a launch's programs run in the first wave.  fp16 weights, threshold rule, no
bias, one linear, split-K as given (``--dtype`` for bf16 or fp32).

The SASS of the main loop (the last backward branch: the weight rows' loop) divided by
the weight elements one thread handles per step gives instructions per weight element:
what bounds a GEMV whose schedulers are busy issuing rather than waiting on memory (ncu,
session 16: Triton's software-pipelined wide tiles spent 6.7-7.2, the register-prefetched
ones 4.5 in bf16).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kernels import sparse_linear_kernels as kern  # noqa: E402

DATA = ("x_ptr", "wt_ptr", "bias_ptr", "out_ptr")  # of the dtype asked for
# every other argument: i32
TYPES = {"score_ptr": "*fp32", "part_ptr": "*fp32", "cnt_ptr": "*i32", "scr_ptr": "*i32", "expert_ptr": "*i32",
         "thr_ptr": "*fp32", "threshold": "fp32", "THRESHOLD1": "fp32", "THRESHOLD2": "fp32"}
# what Triton's launcher specializes at run time for the benchmark shapes (multiples of 16)
DIVISIBLE_BY_16 = ("x_ptr", "wt_ptr", "out_ptr", "score_ptr", "part_ptr", "cnt_ptr", "scr_ptr", "stride_wk",
                   "stride_xm", "N", "K", "K_PER_SPLIT")


KERNELS = {"gemv": kern._gemv_kernel, "gemv_masked": kern._gemv_masked_kernel, "gemv_union": kern._gemv_union_kernel}


def compile_for_sm90(path: str, block_n: int, rows: int, warps: int, stages: int, split: int, reduce: int,
                     row_sum: bool, dtype: str = "fp16", tokens: int = 1):
    """The compiled kernel; ``dtype`` ("fp16", "bf16", "fp32"): the type of x, W^T, bias and out
    (bf16 wide tiles read as int32 pairs, UNPACK, as the launcher does); ``tokens``: BLOCK_M of
    ``gemv_union`` (every token in one program), TOKENS of ``gemv_masked`` (1, or 2: a pair)."""
    kernel = KERNELS[path]
    consts = dict(SPLIT_K=split, MODE=0, HAS_BIAS=False, REDUCE=reduce, BLOCK_N=block_n, STAGES=stages, GROUPS=1,
                  ENDS_ALIGNED=False, ROW_SUM=row_sum)
    if path == "gemv_union":
        consts.update(BLOCK_M=tokens, BLOCK_R=rows, BLOCK_KS=512, IEEE=dtype == "fp32")
    else:
        consts.update(EXPERTS=False, PDL=True, UNPACK=row_sum and dtype == "bf16")
        consts.update(dict(BLOCK_R=rows, BLOCK_KS=512) if path == "gemv" else dict(BLOCK_K=rows, TOKENS=tokens))
    names = list(inspect.signature(kernel.fn).parameters)
    types = {**TYPES, **{n: f"*{dtype}" for n in DATA}}
    signature = {n: "constexpr" if n in consts else types.get(n, "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE_BY_16 if n in names}
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def resource_usage(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = " ".join(line.strip() for line in out.splitlines() if "REG" in line)
    return f"{usage} | shared memory {compiled.metadata.shared} bytes"


def sass(compiled) -> str:
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def loop_instructions(compiled) -> int:
    """Instructions from the target of the last backward branch to that branch: the body of
    the kernel's last loop (the GEMVs' weight rows)."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass(compiled))]
    body = 0
    for addr, op in code:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", op)
        if target and target.group(1) and int(target.group(1), 16) < addr:
            body = sum(1 for a, _ in code if int(target.group(1), 16) <= a <= addr)
    return body


DEFAULTS = [  # (path, BLOCK_N, rows, warps, stages, split, REDUCE, ROW_SUM)
    ("gemv_masked", 1024, 8, 4, 1, 38, 2, True),  # dispatched below 40 % (session 16)
    ("gemv_masked", 512, 8, 2, 1, 30, 2, True),   # dispatched from 40 %
    ("gemv_masked", 512, 16, 2, 1, 30, 2, True),  # dispatched from 40 % for weights of at most 2**24 elements
    ("gemv", 1024, 8, 4, 1, 15, 2, True),         # dispatched from 60 / 70 %
    ("gemv_masked", 32, 256, 4, 3, 3, 2, False),  # session 8-15's o and q/k/v tiles at 50 % (narrow,
                                                  # pipelined by Triton: 6.3 instructions per element)
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", choices=list(KERNELS))
    ap.add_argument("--tokens", type=int, default=1, help="tokens in each program: BLOCK_M of gemv_union, TOKENS of gemv_masked (1 or 2)")
    ap.add_argument("--block-n", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=8, help="BLOCK_K (masked) or BLOCK_R (compacted)")
    ap.add_argument("--warps", type=int, default=8)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--split", type=int, default=16)
    ap.add_argument("--reduce", type=int, default=2, choices=[0, 1, 2])
    ap.add_argument("--no-row-sum", action="store_true")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = ap.parse_args()
    configs = DEFAULTS if args.path is None else [(args.path, args.block_n, args.rows, args.warps, args.stages,
                                                   args.split, args.reduce, not args.no_row_sum)]
    for cfg in configs:
        compiled = compile_for_sm90(*cfg, args.dtype, args.tokens)
        per_thread = cfg[1] * cfg[2] // (32 * cfg[3])  # weight elements a thread loads a step
        print(f"{cfg[0]:11s} {cfg[1]:4d} cols x {cfg[2]:3d} rows, {cfg[3]} warps, {cfg[4]} stages, split {cfg[5]}, "
              f"REDUCE {cfg[6]}, ROW_SUM {cfg[7]}, {args.dtype}"
              f"{f', {args.tokens} tokens' if args.tokens > 1 else ''}: {resource_usage(compiled)} | "
              f"main loop {loop_instructions(compiled) / per_thread:.2f} instructions per weight element",
              flush=True)


if __name__ == "__main__":
    main()
