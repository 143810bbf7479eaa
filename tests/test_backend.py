"""backend="wina" end to end on tiny random-weight models of four families."""
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, tiny_model

import wina_fx

LINEAR_KINDS = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}


def _rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 1000), method=st.sampled_from(["wina", "teal"]))
def test_sparsity_zero_reproduces_eager(family, seed, method):
    torch._dynamo.reset()
    model, ids = tiny_model(family, seed)
    with torch.no_grad():
        expected = model(ids).logits
        out = torch.compile(model, backend="wina", options={"method": method, "sparsity": 0.0})(ids).logits
    assert _rel_err(out, expected) < 1e-5
    report = wina_fx.last_report()
    sparse = {row.name.rsplit(".", 1)[-1] for row in report.sparse_rows}
    assert sparse == set(LINEAR_KINDS[family])
    assert report.row("lm_head").status == "dense: output head (logits projection)"


@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_half_sparsity_measures_its_target_and_leaves_weights_bit_identical(family):
    model, ids = tiny_model(family, seed=3)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    compiled = torch.compile(model, backend="wina", options={"sparsity": 0.5, "measure": True})
    with torch.no_grad():
        out = compiled(ids).logits
        compiled(ids[:, :5])
    assert torch.isfinite(out).all()
    report = wina_fx.last_report()
    for row in report.sparse_rows:
        # top-k keeps round(K/2) channels of every token: exact up to rounding of odd K
        assert abs(row.measured_sparsity - 0.5) <= 0.5 / row.in_features + 1e-9, row
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_sparsity_patterns_choose_linears_and_leave_the_rest_dense():
    model, ids = tiny_model("llama")
    options = {"sparsity": {"*.mlp.down_proj": 0.25, "model.layers.1.*": 0.5}}
    with torch.no_grad():
        torch.compile(model, backend="wina", options=options, fullgraph=True)(ids)
    report = wina_fx.last_report()
    assert report.row("model.layers.0.mlp.down_proj").target_sparsity == 0.25
    assert report.row("model.layers.1.mlp.down_proj").target_sparsity == 0.25
    assert report.row("model.layers.1.self_attn.q_proj").target_sparsity == 0.5
    row = report.row("model.layers.0.self_attn.q_proj")
    assert row.status == "dense: no pattern of option 'sparsity' matches its name"
    assert "model.layers.0.self_attn.q_proj" in str(report)


def test_threshold_mode_with_calibration_under_inductor(tmp_path):
    model, ids = tiny_model("mistral", seed=5)
    batches = [torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(6)]
    calibration = wina_fx.calibrate(model, batches, method="wina", progress=False)
    path = tmp_path / "tiny.cal"
    calibration.save(path)
    options = {"selection": "threshold", "calibration": str(path), "sparsity": 0.4, "measure": True}
    with torch.no_grad():
        for batch in batches:
            torch.compile(model, backend="wina", options=options)(batch)
    report = wina_fx.last_report()
    assert len(report.sparse_rows) == 14
    # thresholds were calibrated on these very batches: every linear hits its target
    for row in report.sparse_rows:
        assert abs(row.measured_sparsity - 0.4) < 0.02, row


def test_calibration_files_that_are_corrupt_or_foreign_fail_clearly(tmp_path):
    llama, _ = tiny_model("llama")
    qwen, ids = tiny_model("qwen2")
    calibration = wina_fx.calibrate(llama, [torch.randint(0, 96, (1, 12))], progress=False)
    good = tmp_path / "llama.cal"
    calibration.save(good)
    assert wina_fx.Calibration.load(good).names == calibration.names

    corrupt = tmp_path / "corrupt.cal"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable wina-fx calibration file"):
        wina_fx.Calibration.load(corrupt)
    other = tmp_path / "other.cal"
    torch.save({"some": "dict"}, other)
    with pytest.raises(ValueError, match="not a wina-fx calibration file"):
        wina_fx.Calibration.load(other)

    options = {"selection": "threshold", "calibration": calibration}
    with pytest.raises(ValueError, match="belongs to another model"):
        torch.compile(qwen, backend="wina", options=options)(ids)
    with pytest.raises(ValueError, match="measured for method 'wina'"):
        wina_fx.WinaConfig.from_options({**options, "method": "teal"})


def test_backend_is_found_by_entry_point_in_a_fresh_interpreter():
    code = (
        "import torch\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))\n"
        "y = torch.compile(m, backend='wina', options={'sparsity': 0.5, 'inductor': False})(torch.randn(3, 8))\n"
        "import wina_fx\n"
        "print(len(wina_fx.last_report().sparse_rows), tuple(y.shape))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "(3,", "4)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 11])
@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_cuda_triton_path_matches_the_cpu_reference(selection, tokens):
    """Three calls: the first re-lays the weights out and runs op by op, the later ones run
    the Inductor-compiled graph (one token: the GEMV kernels; eleven: the batched path)."""
    model, ids = tiny_model("qwen2", seed=7, hidden=128)
    options = {"sparsity": 0.5, "selection": selection, "measure": True}
    if selection == "threshold":
        options["calibration"] = wina_fx.calibrate(model, [ids], progress=False)
    ids = ids[:, :tokens]
    with torch.no_grad():
        expected = torch.compile(model, backend="wina", options={**options, "inductor": False})(ids).logits
        torch._dynamo.reset()
        gpu_model = model.cuda()
        try:
            step = torch.compile(gpu_model, backend="wina", options=options)
            outs = [step(ids.cuda()).logits.cpu() for _ in range(3)]
        finally:
            model.cpu()
    for call, out in enumerate(outs):
        assert _rel_err(out, expected) < 1e-3, call
    measured = [r.measured_sparsity for r in wina_fx.last_report().sparse_rows]
    if selection == "topk":
        assert all(abs(m - 0.5) < 0.01 for m in measured), measured
    else:  # a calibrated threshold on one token: single linears scatter (0.32 seen on CPU)
        assert abs(sum(measured) / len(measured) - 0.5) < 0.05 and all(abs(m - 0.5) < 0.25 for m in measured), measured


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA GPU of sm_90 or newer")
def test_cuda_one_token_steps_with_programmatic_dependent_launch_match_the_cpu_reference():
    """On sm_90+ the backend compiles its graphs with Inductor's programmatic dependent launch
    (option ``pdl``, on by default): the norms, rotary, attention glue and activations after
    each sparse GEMV, and each GEMV after them, may start while the kernel before runs.
    One-token logits still match the CPU reference, call after call; with ``pdl=False``
    every kernel launches as usual."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip(f"torch {torch.__version__}: Inductor has no programmatic dependent launch")
    model, ids = tiny_model("qwen2", seed=7, hidden=128)
    options = {"sparsity": 0.5, "selection": "threshold", "calibration": wina_fx.calibrate(model, [ids], progress=False)}
    ids = ids[:1, :1]
    with torch.no_grad():
        expected = torch.compile(model, backend="wina", options={**options, "inductor": False})(ids).logits
        gpu_model = model.cuda()
        try:
            for pdl in (True, False):
                torch._dynamo.reset()
                step = torch.compile(gpu_model, backend="wina", options={**options, "pdl": pdl})
                step(ids.cuda())  # the first call of the first compile re-lays out and runs op by op
                _, code = run_and_get_code(lambda: step(ids.cuda()))
                assert any("'launch_pdl': True" in c for c in code) == pdl, pdl
                gemvs = [d for c in code for d in c.split("async_compile.triton(")[1:] if "def _gemv" in d]
                assert gemvs and all(("'launch_pdl': True" in d) == pdl for d in gemvs), pdl  # early_launch.py
                outs = [step(ids.cuda()).logits.cpu() for _ in range(6)]
                for call, out in enumerate(outs):
                    assert _rel_err(out, expected) < 1e-3, (pdl, call)
        finally:
            model.cpu()
            torch._dynamo.reset()


def test_programmatic_launch_only_for_graphs_on_one_sm90_gpu(monkeypatch):
    """The backend asks Inductor for programmatic dependent launch only where every input
    lives on one sm_90+ GPU and this torch's Inductor has ``triton.enable_pdl``."""
    import torch._inductor.config as inductor_config
    from wina_fx import early_launch

    cpu = [torch.ones(2), 3]
    assert not early_launch.wanted(cpu)
    from wina_fx.kernels import sparse_linear

    monkeypatch.setattr(sparse_linear, "hopper", lambda device: device.type == "meta")
    meta = [torch.ones(2, device="meta"), 3]
    assert early_launch.wanted(meta) == hasattr(inductor_config.triton, "enable_pdl")
    assert not early_launch.wanted(meta + [torch.ones(2)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 11])
def test_cuda_grouped_launches_match_the_cpu_reference(tokens):
    """q/k/v (with Qwen2's biases) and gate/up as one launch each: the logits of a decode-sized
    (one token: the grouped kernel) and a prefill-sized input match the CPU reference."""
    model, ids = tiny_model("qwen2", seed=7, hidden=128)
    calibration = wina_fx.calibrate(model, [ids], progress=False)
    ids = ids[:1, :tokens]
    options = {"sparsity": 0.5, "selection": "threshold", "calibration": calibration}
    with torch.no_grad():
        expected = torch.compile(model, backend="wina", options={**options, "inductor": False})(ids).logits
        gpu_model = model.cuda()
        try:
            outs = {}
            for group in (True, False):
                torch._dynamo.reset()
                step = torch.compile(gpu_model, backend="wina", options={**options, "group": group})
                step(ids.cuda())  # the first call of the first compile re-lays out and runs op by op
                outs[group] = step(ids.cuda()).logits.cpu()
                grouped_notes = [n for n in wina_fx.last_report().notes if n.startswith("group:")]
                assert grouped_notes == (["group: 10 threshold linears sharing an input run as 4 launches"]
                                         if group else [])
        finally:
            model.cpu()
    for group, out in outs.items():
        assert _rel_err(out, expected) < 1e-3, group
