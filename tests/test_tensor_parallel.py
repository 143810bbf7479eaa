"""Tensor parallelism on two CPU processes (gloo): examples/tensor_parallel.py compiles a tiny
Llama sharded with ColwiseParallel / RowwiseParallel through backend="wina" (threshold,
calibrated) and compares it with the model compiled in one process."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch without distributed")
def test_two_ranks_match_one_process_with_the_same_collectives():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(ROOT, "examples", "tensor_parallel.py"), "--device", "cpu", "--tiny"],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    *_, comm, last = lines
    assert last.startswith("tp=2 vs one process: max relative error ")
    assert float(last.rsplit(" ", 1)[1]) < 1e-5, last
    # every sparse op ran on its rank's shards: no weight was gathered
    dense, sparse = (int(part.rsplit(" ", 1)[1]) for part in comm.split(":", 1)[1].split(","))
    assert dense == sparse == 4, comm
    assert "14 of 15 linears sparse" in result.stdout
