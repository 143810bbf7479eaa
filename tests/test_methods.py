"""The contract every registered method keeps, run over all of them (the built-in ones and
one defined here, outside the package, as a user would), and the README's method example."""
import os
import subprocess
import sys

import pytest
import torch

import wina_fx
from tiny_models import tiny_model
from wina_fx.methods import get_method, method_names, register_method, unregister_method
from wina_fx.methods.base import column_norms

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


class OutsideMethod(wina_fx.Method):
    """|x_i| * ||W[:, i]||_inf: a scored method that only gives its score."""

    name = "test-wina-inf"

    def score(self, weight):
        return weight.detach().abs().float().amax(dim=0)


OUTSIDE = OutsideMethod.name


@pytest.fixture(autouse=True, scope="module")
def outside_method():
    """Registered for this module's tests only: other tests see the built-in methods."""
    register_method(OutsideMethod())
    yield
    unregister_method(OUTSIDE)


def _linear_names(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("name", method_names() + (OUTSIDE,))
def test_method_contract(name, tmp_path):
    """Sparsity 0 reproduces eager (top-k, and threshold where calibrated); the report has a
    row per linear; a calibration round-trips through a file; bad options fail before the
    model runs."""
    method = get_method(name)
    model, ids = tiny_model("llama", seed=3)
    with torch.no_grad():
        eager = model(ids).logits
    calibration = None
    if method.calibrated:
        calibration = wina_fx.calibrate(model, [ids], method=name, progress=False)
        path = tmp_path / "calibration.pt"
        calibration.save(path)
        loaded = wina_fx.Calibration.load(path)
        assert loaded.method == name and loaded.names == calibration.names
        for linear in calibration.names:
            assert loaded.threshold(linear, 0.5) == calibration.threshold(linear, 0.5)
        calibration = str(path)  # options take the path too
    else:
        with pytest.raises(ValueError, match="calibrate: method must be one of"):
            wina_fx.calibrate(model, [ids], method=name, progress=False)
    selections = ["topk"] + (["threshold"] if method.calibrated else [])
    for selection in selections:
        torch._dynamo.reset()
        options = {"method": name, "sparsity": 0.0, "selection": selection, "inductor": False}
        if calibration is not None:
            options["calibration"] = calibration
        with torch.no_grad():
            out = torch.compile(model, backend="wina", options=options)(ids).logits
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5, msg=f"{name} {selection}")
        rows = {row.name for row in wina_fx.last_report().rows}
        assert _linear_names(model) <= rows, f"{name}: linears missing from the report"
    for bad in ({"method": name, "sparsity": 1.5}, {"method": name, "selection": "sometimes"}):
        torch._dynamo.reset()
        with pytest.raises(wina_fx.WinaOptionError):
            wina_fx.WinaConfig.from_options(bad)
        compiled = torch.compile(model, backend="wina", options=bad)
        with pytest.raises(wina_fx.WinaOptionError):
            compiled(ids)


def test_outside_method_sparsifies_with_its_own_score():
    """The outside method gates every linear but the head, with its own score vector."""
    model, ids = tiny_model("llama", seed=4)
    with torch.no_grad():
        torch.compile(model, backend="wina", options={"method": "test-wina-inf", "sparsity": 0.5,
                                                      "inductor": False, "measure": True})(ids)
    report = wina_fx.last_report()
    assert report.method == "test-wina-inf"
    assert len(report.sparse_rows) == len(_linear_names(model)) - 1  # all but lm_head
    assert all(abs(r.measured_sparsity - 0.5) < 0.05 for r in report.sparse_rows)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(wina_fx.methods.channel_scores("test-wina-inf", weight), column_norms(weight))


def test_registry_refuses_what_it_cannot_use():
    with pytest.raises(ValueError, match="registered already"):
        register_method(OutsideMethod())
    with pytest.raises(ValueError, match="no method 'nope'"):
        unregister_method("nope")
    with pytest.raises(TypeError, match="Method instance"):
        register_method(OutsideMethod)
    with pytest.raises(ValueError, match="no method 'nope'; registered: 'wina'"):
        get_method("nope")
    with pytest.raises(wina_fx.WinaOptionError, match="option 'method' must be one of 'wina', 'teal'"):
        wina_fx.WinaConfig(method="nope")
    with pytest.raises(ValueError, match="greedy allocation: method must be one of 'wina', 'teal'"):
        wina_fx.allocation.check_method("test-wina-inf")  # allocated = False


def test_readme_method_example_runs_as_written():
    """README, "## Adding a method": its python block runs in a fresh interpreter."""
    with open(README) as f:
        block = f.read().split("## Adding a method", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "method=wina-l1 selection=threshold: 14 of 15 linears sparse" in result.stdout
    change = float(result.stdout.strip().splitlines()[-1].split(":")[-1])
    assert 0 < change < 1
