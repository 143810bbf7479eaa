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
    # every sparse op ran on its rank's shards, no weight was gathered: two all-reduces a
    # layer and the logits' all-gather, as in the dense sharded model
    dense, sparse = (int(part.rsplit(" ", 1)[1]) for part in comm.split(":", 1)[1].split(","))
    assert dense == sparse == 5, comm
    assert "14 of 15 linears sparse" in result.stdout


def _relayout_worker(rank: int, world: int, port: int) -> None:
    """One rank of the test below."""
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import tensor_parallel as example

    import wina_fx
    from wina_fx.passes import weight_layout

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = example.tiny_llama()
        ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
        calibration = wina_fx.calibrate(model, [ids], progress=False)
        options = {"sparsity": 0.5, "selection": "threshold", "calibration": calibration, "inductor": False}
        with torch.no_grad():
            expected = torch.compile(model, backend="wina", options=options)(ids).logits
        sharded = example.tensor_parallel(copy.deepcopy(model), init_device_mesh("cpu", (world,)))
        # calibrating the sharded model gives the one-process thresholds (activations gathered whole)
        sharded_calibration = wina_fx.calibrate(sharded, [ids], progress=False)
        assert sharded_calibration.names == calibration.names
        for name in calibration.names:
            assert abs(sharded_calibration.threshold(name, 0.5) - calibration.threshold(name, 0.5)) <= \
                1e-5 * abs(calibration.threshold(name, 0.5)), name
        q = sharded.model.layers[0].self_attn.q_proj.weight
        before = q.to_local().clone()
        weight_layout.kernels_read_rows = lambda weight: True  # the CUDA decisions, on the CPU
        torch._dynamo.reset()
        step = torch.compile(sharded, backend="wina", options=options)
        with torch.no_grad():
            outs = [step(ids).logits for _ in range(2)]  # the first call re-lays the shards out
        local = q._local_tensor
        assert local.t().is_contiguous() and torch.equal(local, before), "local shard not stored as W^T in place"
        for out in outs:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert not any(n.startswith("group:") for n in wina_fx.last_report().notes)
        # through Inductor the graph is traced to its local shards, where q/k/v and gate/up
        # (their shards now side by side in one buffer) run as one launch each
        torch._dynamo.reset()
        step = torch.compile(sharded, backend="wina", options={**options, "inductor": True})
        with torch.no_grad():
            outs = [step(ids).logits for _ in range(2)]
        assert "group: 10 threshold linears sharing an input run as 4 launches" in wina_fx.last_report().notes
        attention = sharded.model.layers[0].self_attn
        shards = [p._local_tensor.t() for p in (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)]
        assert weight_layout.side_by_side(shards) is not None, "q/k/v shards not side by side: the group copies them"
        for out in outs:
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(q._local_tensor, before)
        _local_graph_keeps_what_aot_reads(sharded, ids)
        _gradients_reach_the_sharded_weights(sharded, ids, options)
        _row_parallel_bias_matches(world)
        # TEAL's unit scores on a sharded weight: ones, placed like column norms, whatever its values
        from wina_fx import sharded as sharding
        down = sharded.model.layers[0].mlp.down_proj.weight.detach().clone()
        down._local_tensor[0, 0] = float("nan")
        down._local_tensor[-1, -1] = float("inf")
        ones = sharding.unit_scores(down)
        assert ones.placements == sharding.column_norms(down).placements
        assert torch.equal(ones.full_tensor(), torch.ones(down.shape[1]))
    finally:
        dist.destroy_process_group()


def _local_graph_keeps_what_aot_reads(sharded, ids) -> None:
    """passes/localize.py on dynamo's graph of the sharded model: no DTensor is left, the
    collectives are there, and each input keeps its dynamo source and static mark (CUDA
    graphs would copy every weight at each replay without them)."""
    import torch
    from torch.distributed.tensor import DTensor

    from wina_fx.passes.localize import localize

    seen = {}

    def backend(gm, example_inputs):
        seen["local"], seen["gm"] = localize(gm, example_inputs), gm
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(sharded, backend=backend)(ids)
    local, gm = seen["local"], seen["gm"]
    values = [n.meta.get("val") for n in local.graph.nodes]
    assert not any(isinstance(v, DTensor) for v in values)
    assert any("all_reduce" in str(n.target) for n in local.graph.nodes)
    old, new = gm.graph.find_nodes(op="placeholder"), local.graph.find_nodes(op="placeholder")
    assert len(old) == len(new) and local.meta["dynamo_compile_id"] == gm.meta["dynamo_compile_id"]
    static = [n.name for n in old if n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type")]
    assert len(static) >= 14  # the sparse linears' weights at least
    for a, b in zip(old, new):
        assert b._dynamo_source == a._dynamo_source
        assert b.meta.get("tensor_dict") == a.meta.get("tensor_dict")


def _gradients_reach_the_sharded_weights(sharded, ids, options) -> None:
    """A training step through the backend (Inductor) gives the DTensor weights the gradients
    eager tensor parallel gives them (the graph is not traced down to local shards then)."""
    import torch

    grads = []
    for step in (sharded, torch.compile(sharded, backend="wina", options={**options, "sparsity": 0.0,
                                                                        "inductor": True})):
        torch._dynamo.reset()
        sharded.zero_grad(set_to_none=True)
        step(ids).logits.square().mean().backward()
        grads.append(sharded.model.layers[0].mlp.down_proj.weight.grad)
    assert grads[1] is not None, "no gradient reached the sharded weight"
    torch.testing.assert_close(grads[1].full_tensor(), grads[0].full_tensor(), rtol=1e-4, atol=1e-6)


def _row_parallel_bias_matches(world: int) -> None:
    """A row-parallel linear with a bias (no row-parallel strategy: its bias would be added
    once per rank) still computes what one process computes."""
    import copy

    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import wina_fx

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    options = {"sparsity": 0.5, "selection": "threshold", "calibration": wina_fx.calibrate(mlp, [x], progress=False),
               "inductor": False}
    with torch.no_grad():
        torch._dynamo.reset()
        expected = torch.compile(mlp, backend="wina", options=options)(x)
        sharded = parallelize_module(copy.deepcopy(mlp), init_device_mesh("cpu", (world,)),
                                     {"0": ColwiseParallel(), "2": RowwiseParallel()})
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(sharded, backend="wina", options=options)(x), expected,
                                   rtol=1e-5, atol=1e-5)
    assert [r.status for r in wina_fx.last_report().rows] == ["sparse", "sparse"]


def test_local_shards_are_stored_as_the_kernels_read_them():
    """Calibrating the sharded model gives the one-process thresholds.  With the backend's
    CUDA decisions (patched in on the CPU), each rank stores its shard of every sparse weight
    as W^T, in place and bit for bit, and still computes what one process computes: op by op
    with each linear alone (a grouped op has no DTensor strategy), through Inductor with the
    linears sharing an input grouped over the local shards; so does a row-parallel linear
    with a bias."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_relayout_worker, args=(2, port), nprocs=2)


def test_decode_benchmark_runs_on_two_cpu_ranks(tmp_path):
    """The decode benchmark's code path (static cache, dense tp, then wina tp at each
    sparsity) on gloo with a tiny model: every record the GPU run writes is there."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OUT"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         os.path.join(ROOT, "examples", "tensor_parallel.py"), "--device", "cpu", "--decode", "--tiny",
         "--tokens", "4", "--warmup", "1", "--sparsities", "0.5", "--layers", "1"],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "decode_tp2_cpu-tiny.json").read_text())
    assert [(r["impl"], r["sparsity"]) for r in data["records"]] == [("dense_tp", 0.0), ("wina_tp", 0.5)]
    assert all(r["tokens_per_s"] > 0 for r in data["records"]) and data["header"]["ranks"] == 2
    assert "1 layers" in data["header"]["model"] and data["header"]["selection"] == "threshold"
    assert data["records"][1]["notes"] is not None
    # measured on the unsharded model with the same thresholds, as a share of dropped channels
    assert 0.3 < data["records"][1]["measured_sparsity"] < 0.7, data["records"][1]
    assert all(r["host_us_per_step"] > 0 for r in data["records"])
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:  # the plot is optional
        assert (tmp_path / "decode_tp2_cpu-tiny.png").exists()
