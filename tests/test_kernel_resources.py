"""The dispatched GEMV configurations compile for a Hopper GPU, fp16, bf16 and fp32, without
spilling registers and within one SM's shared memory.

The wide tiles hold a 1024-column accumulator and the next step's weight rows per program; a tile
change that spills to local memory still computes right (the interpreter tests pass) but
runs far slower.  Triton compiles for sm_90 without a GPU, and its own cuobjdump reads the
cubin's resource usage (``benchmarks/kernel_resources.py``).  Runs in a fresh process
without ``TRITON_INTERPRET``, which the kernel tests set.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import importlib.util, json, os, sys, torch
spec = importlib.util.spec_from_file_location("kernel_resources", os.path.join(sys.argv[1], "benchmarks", "kernel_resources.py"))
kr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kr)
from kernels import sparse_linear as sl

report = {}
for N, K, sizes in [(17920, 5120, None), (4096, 14336, None), (28672, 4096, (14336, 14336)), (4096, 4096, None),
                    (1024, 4096, None)]:
    for s in (0.25, 0.5, 0.65, 0.8):
        for deterministic in (False, True):
            torch.use_deterministic_algorithms(deterministic)
            path, cfg = sl._gemv_choice(N, K, 132, s, sizes)
            rows = cfg.get("BLOCK_K", cfg.get("BLOCK_R"))
            key = f"{path} {cfg['BLOCK_N']}x{rows} w{cfg['num_warps']} s{cfg['STAGES']} split{cfg['SPLIT_K']} reduce{cfg['REDUCE']} {cfg.get('ROW_SUM', False)}"
            for dtype in ("fp16", "bf16", "fp32"):
                if f"{key} {dtype}" not in report:
                    compiled = kr.compile_for_sm90(path, cfg["BLOCK_N"], rows, cfg["num_warps"], cfg["STAGES"],
                                                   cfg["SPLIT_K"], cfg["REDUCE"], cfg.get("ROW_SUM", False), dtype)
                    report[f"{key} {dtype}"] = kr.resource_usage(compiled)
print(json.dumps(report))
'''


def test_dispatched_configurations_do_not_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", SCRIPT, ROOT], capture_output=True, text=True, env=env,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report) >= 18  # masked and compacted, wide and narrow, both reductions, fp16, bf16 and fp32
    for config, usage in report.items():
        # spilled registers show as a stack frame (a spilled accumulator: kilobytes); the
        # deterministic masked tiles keep an 8-byte one
        stack = int(usage.split("STACK:", 1)[1].split()[0])
        assert stack <= 16 and "LOCAL:0" in usage, (config, usage)
        shared = int(usage.rsplit("shared memory ", 1)[1].split()[0])
        assert shared <= 227 * 1024, (config, usage)  # fits one SM's shared memory (H100, H200)
