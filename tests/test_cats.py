"""method="cats": the gated-MLP finder, the masking pass, and the backend against a plain
torch reference of CATS's rule (mask where |act(gate(x))| is small, in front of down_proj)."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import logits_with_hooks, tiny_model

import wina_fx
from wina_fx.passes.find_linears import find_linears
from wina_fx.passes.find_mlps import find_gated_mlps


class GatedMLP(torch.nn.Module):
    """Llama's MLP (separate gate/up) or Phi3's (fused gate_up split by chunk or slicing)."""

    def __init__(self, hidden=16, inter=24, split="separate", act=F.silu):
        super().__init__()
        self.split, self.act, self.inter = split, act, inter
        if split == "separate":
            self.gate_proj = torch.nn.Linear(hidden, inter, bias=False)
            self.up_proj = torch.nn.Linear(hidden, inter, bias=False)
        else:
            self.gate_up_proj = torch.nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=True)

    def gate_up(self, x):
        if self.split == "separate":
            return self.gate_proj(x), self.up_proj(x)
        both = self.gate_up_proj(x)
        if self.split == "chunk":
            return both.chunk(2, dim=-1)
        return both[..., : self.inter], both[..., self.inter:]

    def forward(self, x):
        gate, up = self.gate_up(x)
        return self.down_proj(self.act(gate) * up)


class NotGated(torch.nn.Module):
    """Shapes that look like an MLP but are not act(gate(x)) * up(x)."""

    def __init__(self, hidden=16, inter=24):
        super().__init__()
        self.fc1 = torch.nn.Linear(hidden, inter)
        self.fc2 = torch.nn.Linear(inter, hidden)  # plain MLP: fc2(gelu(fc1(x)))
        self.g = torch.nn.Linear(hidden, inter)
        self.d = torch.nn.Linear(inter, hidden)  # d(silu(g(x)) * g(x)): one linear, not two
        self.other = torch.nn.Linear(hidden, inter)
        self.d2 = torch.nn.Linear(inter, hidden)  # d2(silu(g(x)) * other(y)): different inputs

    def forward(self, x, y):
        h = self.fc2(F.gelu(self.fc1(x)))
        g = self.g(x)
        return h + self.d(F.silu(g) * g) + self.d2(F.silu(self.g(x)) * self.other(y))


def cats_reference(x, mlp: GatedMLP, sparsity=None, threshold=None):
    """CATS written out: keep channel i where |silu(gate)_i| is among the top k (or > t)."""
    gate, up = mlp.gate_up(x)
    act = mlp.act(gate)
    if threshold is None:
        k = max(1, round((1 - sparsity) * act.shape[-1]))
        keep = torch.zeros_like(act, dtype=torch.bool).scatter_(-1, act.abs().topk(k, dim=-1).indices, True)
    else:
        keep = act.abs() > threshold
    return mlp.down_proj(torch.where(keep, act * up, 0.0))


@pytest.mark.parametrize("split", ["separate", "chunk", "slice"])
def test_find_gated_mlps_recognises_llama_and_phi3_forms(split):
    gm = fx.symbolic_trace(GatedMLP(split=split))
    sites = find_linears(gm)
    mlps = find_gated_mlps(sites)
    names = [s.name for s in sites]
    assert list(mlps) == [names.index("down_proj")]
    mlp = mlps[names.index("down_proj")]
    if split == "separate":
        assert (names[mlp.gate], names[mlp.up]) == ("gate_proj", "up_proj")
    else:
        assert mlp.fused and names[mlp.gate] == "gate_up_proj"


def test_find_gated_mlps_leaves_other_shapes_out():
    gm = fx.symbolic_trace(NotGated())
    assert find_gated_mlps(find_linears(gm)) == {}


def _compile(module, options, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(module, backend="wina", options={"method": "cats", "inductor": False, **options})(*args)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**31 - 1),
    split=st.sampled_from(["separate", "chunk", "slice"]),
    sparsity=st.sampled_from([0.1, 0.25, 0.5, 0.7, 0.9]),
    tokens=st.integers(1, 5),
)
def test_compiled_cats_matches_the_reference_rule_on_random_layers(seed, split, sparsity, tokens):
    torch.manual_seed(seed)
    mlp = GatedMLP(split=split).eval()
    x = torch.randn(2, tokens, 16)
    out = _compile(mlp, {"sparsity": sparsity, "measure": True}, x)
    torch.testing.assert_close(out, cats_reference(x, mlp, sparsity), rtol=1e-5, atol=1e-5)
    report = wina_fx.last_report()
    down = report.row("down_proj")
    assert down.status == "sparse" and down.target_sparsity == sparsity
    keep = max(1, round((1 - sparsity) * 24))
    assert down.measured_sparsity == pytest.approx(1 - keep / 24)


def test_compiled_cats_with_calibrated_thresholds_matches_the_reference_rule():
    torch.manual_seed(0)
    mlp = GatedMLP(split="chunk").eval()
    batches = [torch.randn(1, 8, 16) for _ in range(4)]
    calibration = wina_fx.calibrate(mlp, batches, method="cats", progress=False)
    assert calibration.names == ["down_proj"]
    threshold = calibration.threshold("down_proj", 0.6)
    x = torch.randn(3, 16)
    options = {"sparsity": 0.6, "selection": "threshold", "calibration": calibration}
    torch.testing.assert_close(_compile(mlp, options, x), cats_reference(x, mlp, threshold=threshold),
                               rtol=1e-5, atol=1e-5)


def _hooked_reference(model, ids, sparsity):
    """The model's own eager forward, with CATS's mask put in front of every down_proj by
    hooks: the activation's output is recorded, the down projection's input masked."""
    acts, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith(".mlp"):
            act_fn = getattr(module, "act_fn", None) or module.activation_fn

            def record(_mod, _inp, out, key=name):
                acts[key] = out

            def mask(_mod, args, key=name):
                act = acts[key]
                k = max(1, round((1 - sparsity) * act.shape[-1]))
                keep = torch.zeros_like(act, dtype=torch.bool).scatter_(-1, act.abs().topk(k, dim=-1).indices, True)
                return (torch.where(keep, args[0], 0.0),)

            handles.append(act_fn.register_forward_hook(record))
            handles.append(module.down_proj.register_forward_pre_hook(mask))
    return logits_with_hooks(model, ids, handles)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_tiny_models_match_the_hooked_reference_and_report_each_linear(family):
    model, ids = tiny_model(family, seed=4)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        dense = model(ids).logits
        at_zero = _compile(model, {"sparsity": 0.0}, ids).logits
    torch.testing.assert_close(at_zero, dense, rtol=1e-6, atol=1e-6)  # sparsity 0 is the dense model

    out = _compile(model, {"sparsity": 0.5, "measure": True}, ids).logits
    torch.testing.assert_close(out, _hooked_reference(model, ids, 0.5), rtol=1e-5, atol=1e-5)
    assert (out - dense).abs().max() > 1e-3  # the mask did something

    report = wina_fx.last_report()
    statuses = {row.name.split(".", 3)[-1]: row.status for row in report.rows if row.name.startswith("model.layers.1.")}
    assert statuses.pop("mlp.down_proj") == "sparse"
    if family == "llama":
        assert statuses.pop("mlp.gate_proj").startswith("dense: cats computes the gate projection dense")
        assert statuses.pop("mlp.up_proj").startswith("dense: cats masks its output rows")
    else:
        assert statuses.pop("mlp.gate_up_proj").startswith("dense: cats computes the fused gate/up projection dense")
    assert statuses and all(s.startswith("dense: cats sparsifies only the MLP") for s in statuses.values())
    assert report.row("lm_head").status == "dense: output head (logits projection)"
    for row in report.sparse_rows:
        assert row.measured_sparsity == pytest.approx(0.5)  # top-k of 144 channels keeps 72
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_graph_without_gated_mlp_stays_dense_and_says_why():
    module = NotGated()
    x, y = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        out = _compile(module, {"sparsity": 0.5}, x, y)
        torch.testing.assert_close(out, module(x, y))
    report = wina_fx.last_report()
    assert not report.sparse_rows
    assert all(row.status.startswith("dense: cats sparsifies only the MLP") for row in report.rows)


def test_cats_thresholds_need_a_cats_calibration():
    with pytest.raises(ValueError, match="needs option 'calibration'"):
        wina_fx.WinaConfig.from_options({"method": "cats", "selection": "threshold"})
    mlp = GatedMLP()
    calibration = wina_fx.calibrate(mlp, [torch.randn(4, 16)], method="teal", progress=False)
    with pytest.raises(ValueError, match="measured for method 'teal'.*calibrate again with method='cats'"):
        wina_fx.WinaConfig.from_options({"method": "cats", "selection": "threshold", "calibration": calibration})
    with pytest.raises(ValueError, match="'method' must be one of 'wina', 'teal', 'cats', 'rsparse', 'dense'"):
        wina_fx.WinaConfig.from_options({"method": "CATS"})


def test_calibrated_thresholds_on_phi3_reach_their_target(tmp_path):
    model, _ = tiny_model("phi3", seed=6)
    batches = [torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    calibration = wina_fx.calibrate(model, batches, method="cats", progress=False)
    assert calibration.names == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    path = tmp_path / "phi3.cats.cal"
    calibration.save(path)
    options = {"selection": "threshold", "calibration": str(path), "sparsity": 0.4, "measure": True}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="wina", options={"method": "cats", "inductor": False, **options})
    with torch.no_grad():
        for batch in batches:
            compiled(batch)
    rows = wina_fx.last_report().sparse_rows
    assert [row.name for row in rows] == calibration.names
    for row in rows:  # calibrated on these very batches: each MLP zeroes its target share
        assert abs(row.measured_sparsity - 0.4) < 0.02, row
