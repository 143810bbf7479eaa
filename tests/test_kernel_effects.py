"""What Inductor believes the GEMV kernels write.

Traced from a ``triton_op``, a user Triton kernel is functionalized: Inductor runs torch's
analysis of the kernel's TTIR and clones, then writes back, every tensor it finds written.
The analysis counts as written each pointer from which a store address is computed, and
every pointer passed to a called ``@triton.jit`` function whose result reaches one.  A
kernel that let a weight or score pointer reach a store address that way got the whole
tensor copied twice per launch (an H200 decode of Mixtral-shaped experts: 10 ms a step).
This checks that, for every launch configuration the launchers use, only the output, the
split-K partials and tickets, and the compaction scratch are written.

Runs the analysis in a fresh process (no ``TRITON_INTERPRET``, which the kernel tests set)
against a CUDA target; it needs no GPU.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import json, torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class CudaTarget:  # the analysis only asks the driver for its target
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

driver.set_active(CudaTarget())
import torch._higher_order_ops.triton_kernel_wrap as wrap
from wina_fx.kernels import sparse_linear_kernels as kern

analyse = getattr(wrap, "identify_accessed_tensors", None)
if analyse is None:
    print(json.dumps(None)); raise SystemExit
S, K, N, E = 2, 64, 96, 4
t = lambda *s, dt=torch.float16: torch.empty(*s, dtype=dt, device="meta")
results = {}
for kernel in ("_gemv_kernel", "_gemv_masked_kernel"):
    # REDUCE 2 (the dispatched split-K: float32 sums in the ticket buffer) on the wide tiles
    # the wide tiles (ROW_SUM: loads prefetched into registers; UNPACK: bf16 column pairs) as dispatched
    for groups, experts, row_sum, reduce, unpack in (
            (1, False, False, 1, False), (1, True, False, 1, False), (2, False, False, 1, False),
            (1, False, True, 2, False), (1, False, True, 2, True), (2, False, True, 2, True), (1, True, True, 2, True)):
        args = dict(x_ptr=t(S, K), wt_ptr=t(E, K, N), bias_ptr=t(S, N), score_ptr=t(max(E, groups), K, dt=torch.float32),
                    out_ptr=t(S, N), part_ptr=t(2, S, N, dt=torch.float32), cnt_ptr=t(8, dt=torch.int32),
                    M=S, N=N, K=K, stride_xm=K, stride_wk=N, stride_om=N, threshold=0.0, K_PER_SPLIT=32,
                    SPLIT_K=2, MODE=0, HAS_BIAS=False, REDUCE=reduce, BLOCK_N=32, STAGES=1,
                    END0=48 if groups > 1 else N, END1=N, THRESHOLD1=0.0, THRESHOLD2=0.0, GROUPS=groups,
                    ENDS_ALIGNED=True, expert_ptr=t(S, dt=torch.int64), thr_ptr=t(E, dt=torch.float32),
                    stride_we=K * N, EXPERTS=experts, ROW_SUM=row_sum, PDL=True, UNPACK=unpack)
        if kernel == "_gemv_kernel":
            args.update(scr_ptr=t(256, dt=torch.int32), BLOCK_R=16, BLOCK_KS=32)
        else:
            args.update(BLOCK_K=32, TOKENS=1)
        # the masked kernel also with two tokens in each program (TOKENS 2: wide tiles, no experts)
        for tokens in (1, 2) if kernel == "_gemv_masked_kernel" and row_sum and not experts else (1,):
            if kernel == "_gemv_masked_kernel":
                args.update(TOKENS=tokens)
            found = analyse(getattr(kern, kernel), args, {})
            launch = (f"{kernel} groups={groups} experts={experts} row_sum={row_sum} reduce={reduce} unpack={unpack}"
                      f" tokens={tokens}")
            results[launch] = sorted(d.name for d in found.read_writes.writes)
print(json.dumps(results))
'''


def _run_compiled_triton(script: str):
    """The JSON value ``script`` prints last, run in a fresh process without ``TRITON_INTERPRET``
    (so that the kernels are ``JITFunction``s, as Inductor sees them)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gemv_kernels_write_only_their_outputs():
    writes = _run_compiled_triton(SCRIPT)
    if writes is None:
        pytest.skip("this torch has no identify_accessed_tensors")
    assert len(writes) == 17
    for launch, written in writes.items():
        allowed = {"out_ptr", "part_ptr", "cnt_ptr"} | ({"scr_ptr"} if launch.startswith("_gemv_kernel") else set())
        assert set(written) <= allowed, (launch, written)


SOURCE_SCRIPT = r'''
import json
from torch._inductor.codegen import wrapper
from wina_fx.kernels import sparse_linear_kernels as kern

closure = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
if closure is None:
    print(json.dumps(None)); raise SystemExit
sources = {name: closure(getattr(kern, name)) for name in ("_gemv_kernel", "_gemv_masked_kernel", "_gemv_union_kernel")}
print(json.dumps(sources))
'''


def test_the_source_inductor_writes_for_each_gemv_reads_back_unchanged():
    """Inductor writes a user kernel's source, with every ``@triton.jit`` helper it calls, into
    a ``'''``-quoted literal of the generated module.  An escape such as ``\\n`` inside a
    string of the kernel then becomes a real line break there, and the module no longer
    parses (the PDL trigger's inline asm did this on the H200)."""
    sources = _run_compiled_triton(SOURCE_SCRIPT)
    if sources is None:
        pytest.skip("this torch has no user_defined_triton_kernel_transitive_closure_source_code")
    assert len(sources) == 3
    for kernel, source in sources.items():
        if kernel != "_gemv_union_kernel":
            assert "_launch_dependents" in source and "_wait_for_prior" in source, kernel
        assert eval("'''" + source + "'''") == source, kernel
        compile(source, kernel, "exec")
