"""method="rsparse": the budget rule, the search, the low-rank pass, and the backend against a
plain torch reference of R-Sparse's rule y = W (x * m) + ((x * (1 - m)) V_r S_r) U_r^T."""
import math

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import logits_with_hooks, tiny_model

import wina_fx
from wina_fx.methods import rsparse
from wina_fx.passes.find_linears import find_linears
from wina_fx.passes.keep_rule import KeepRule
from wina_fx.passes.low_rank import LowRankSplit, split_low_rank


def rsparse_reference(x, weight, bias, channels, rank, threshold=None):
    """R-Sparse written out with its own SVD: mask on |x_i| * ||(V S)[i, :]||, top-k or > t."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    scale = (vh.t() * s).norm(dim=1)
    importance = x.double().abs() * scale
    if threshold is None:
        keep = torch.zeros_like(importance, dtype=torch.bool).scatter_(-1, importance.topk(channels, dim=-1).indices, True)
    else:
        keep = importance > threshold
    x = x.double()
    out = torch.where(keep, x, 0.0) @ weight.double().t() + (torch.where(keep, 0.0, x) @ (vh[:rank].t() * s[:rank])) @ u[:, :rank].t()
    return (out if bias is None else out + bias.double()).to(weight.dtype)


@settings(max_examples=200, deadline=None)
@given(k=st.integers(1, 300), n=st.integers(1, 300), sparsity=st.floats(0, 0.99), share=st.floats(0.01, 1.0))
def test_budget_rule_never_spends_more_than_plain_sparsity(k, n, sparsity, share):
    recipe = rsparse.budget_recipe(k, n, sparsity, share)
    assert 1 <= recipe.channels <= k and 0 <= recipe.rank <= min(k, n)
    cost = recipe.channels * n + recipe.rank * (k + n)
    assert cost <= max((1 - sparsity) * k * n, n) + 1e-6  # (at least one channel is always kept)
    assert recipe.compute_sparsity(k, n) == pytest.approx(1 - cost / (k * n))
    # the rank takes what is left: one more would pass the budget
    assert cost + (k + n) > (1 - sparsity) * k * n or recipe.rank == min(k, n)
    assert rsparse.budget_recipe(k, n, 0.0, 1.0) == rsparse.Recipe(1.0, k, 0)


class Linears(torch.nn.Module):
    def __init__(self, k=20, n=12):
        super().__init__()
        self.a = torch.nn.Linear(k, n)
        self.b = torch.nn.Linear(k, n, bias=False)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), channels=st.integers(1, 20), rank=st.integers(0, 12), tokens=st.integers(1, 4))
def test_low_rank_pass_computes_the_rule_and_full_rank_is_dense(seed, channels, rank, tokens):
    torch.manual_seed(seed)
    module = Linears().double()
    gm = fx.symbolic_trace(module)
    sites = find_linears(gm)
    splits = {}
    for index, site in enumerate(sites):
        f = rsparse.factors(site.weight)
        splits[index] = LowRankSplit(f.scale, *f.low_rank(rank), KeepRule(k=channels))
    split_low_rank(gm, splits, sites)
    x = torch.randn(tokens, 20, dtype=torch.float64)
    expected = torch.relu(rsparse_reference(x, module.a.weight, module.a.bias, channels, rank)) + rsparse_reference(
        x, module.b.weight, None, channels, rank
    )
    torch.testing.assert_close(gm(x), expected)
    if rank == 12:  # rank(W) = 12: the correction restores every dropped channel
        torch.testing.assert_close(gm(x), module(x))


def _compile(module, options, *args):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(module, backend="wina", options={"method": "rsparse", "inductor": False, **options})(*args)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.sampled_from([0.25, 0.5, 0.65]), share=st.sampled_from([0.3, 0.6, 0.95, 1.0]))
def test_compiled_rsparse_matches_the_reference_rule_on_random_layers(seed, sparsity, share):
    torch.manual_seed(seed)
    module = Linears().eval()
    x = torch.randn(2, 3, 20)
    out = _compile(module, {"sparsity": sparsity, "rsparse_share": share, "measure": True}, x)
    recipe = rsparse.budget_recipe(20, 12, sparsity, share)
    with torch.no_grad():
        expected = torch.relu(rsparse_reference(x, module.a.weight, module.a.bias, recipe.channels, recipe.rank))
        expected = expected + rsparse_reference(x, module.b.weight, None, recipe.channels, recipe.rank)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    report = wina_fx.last_report()
    for row in report.rows:
        assert row.status == "sparse"
        assert row.target_sparsity == pytest.approx(recipe.compute_sparsity(20, 12))
        assert row.target_sparsity >= sparsity - 1e-9  # never more compute than plain sparsity
        assert row.measured_sparsity == pytest.approx(1 - recipe.channels / 20)


def _hooked_reference(model, ids, sparsity, share):
    """The model's eager forward with every linear but lm_head replaced, through a forward
    hook, by R-Sparse's rule on its own input."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            recipe = rsparse.budget_recipe(module.in_features, module.out_features, sparsity, share)

            def hook(mod, args, _out, recipe=recipe):
                return rsparse_reference(args[0], mod.weight, mod.bias, recipe.channels, recipe.rank)

            handles.append(module.register_forward_hook(hook))
    return logits_with_hooks(model, ids, handles)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_tiny_models_match_the_hooked_reference(family):
    model, ids = tiny_model(family, seed=2)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with torch.no_grad():
        dense = model(ids).logits
    at_zero = _compile(model, {"sparsity": 0.0, "rsparse_share": 1.0}, ids).logits
    torch.testing.assert_close(at_zero, dense, rtol=1e-6, atol=1e-6)  # sparsity 0 is the dense model
    out = _compile(model, {"sparsity": 0.5, "rsparse_share": 0.6}, ids).logits
    torch.testing.assert_close(out, _hooked_reference(model, ids, 0.5, 0.6), rtol=1e-4, atol=1e-4)
    assert (out - dense).abs().max() > 1e-3
    report = wina_fx.last_report()
    assert report.row("lm_head").status == "dense: output head (logits projection)"
    assert len(report.sparse_rows) == len(report.rows) - 1
    assert f"rsparse: {len(report.sparse_rows)} linears split; sparse share: 0.6 x{len(report.sparse_rows)}" in report.notes[0]
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def _spectrum_case(seed, n_tokens):
    """W with a fast-decaying spectrum (a few directions carry it) and dense Gaussian inputs:
    dropped channels are far from negligible, and a few singular directions recover most of
    them, so a low-rank share should beat spending the budget on channels alone."""
    g = torch.Generator().manual_seed(seed)
    k, n = 96, 64
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
    s = 0.5 ** torch.arange(n, dtype=torch.float64)
    weight = (u * s) @ v[:, :n].t()
    return weight.float(), torch.randn(n_tokens, k, generator=g), torch.randn(n_tokens, k, generator=g)


@pytest.mark.parametrize("selection", ["topk", "threshold"])
def test_search_does_at_least_as_well_as_the_fixed_default_on_held_out_tokens(selection):
    weight, calibration_tokens, held_out = _spectrum_case(0, 256)
    f = rsparse.factors(weight)
    threshold_for = None
    if selection == "threshold":
        importance = (calibration_tokens.abs() * f.scale).flatten()
        threshold_for = lambda s: float(importance.quantile(s)) if s > 0 else -math.inf  # noqa: E731
    found = rsparse.search(weight, calibration_tokens, 0.5, f, threshold_for)
    default = rsparse.budget_recipe(96, 64, 0.5, rsparse.DEFAULT_SHARE)

    def held_out_error(recipe):
        threshold = None if threshold_for is None else threshold_for(recipe.channel_sparsity(96))
        return rsparse.output_error(held_out, weight, f, recipe, threshold)

    assert found.share < rsparse.DEFAULT_SHARE and found.rank > default.rank
    assert held_out_error(found) < 0.5 * held_out_error(default)
    # and where the spectrum is flat and inputs heavy-tailed, it keeps (nearly) all budget sparse
    g = torch.Generator().manual_seed(1)
    flat = torch.linalg.qr(torch.randn(96, 64, generator=g))[0].t()
    tokens = torch.randn(256, 96, generator=g) ** 5
    flat_found = rsparse.search(flat, tokens, 0.5)
    assert flat_found.share >= rsparse.DEFAULT_SHARE
    assert rsparse.output_error(tokens, flat, rsparse.factors(flat), flat_found) <= rsparse.output_error(
        tokens, flat, rsparse.factors(flat), rsparse.budget_recipe(96, 64, 0.5, rsparse.DEFAULT_SHARE)
    )


class Spectral(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.proj = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(weight)

    def forward(self, x):
        return self.proj(x)


def test_backend_search_uses_the_calibration_tokens_and_saves_them(tmp_path):
    weight, tokens, held_out = _spectrum_case(3, 128)
    module = Spectral(weight).eval()
    calibration = wina_fx.calibrate(module, [tokens[:64], tokens[64:]], method="rsparse", progress=False)
    assert calibration.samples["proj"].shape == (128, 96)
    path = tmp_path / "spectral.cal"
    calibration.save(path)
    loaded = wina_fx.Calibration.load(path)
    torch.testing.assert_close(loaded.samples["proj"], calibration.samples["proj"])

    found = rsparse.search(weight, loaded.samples["proj"], 0.5)
    out = _compile(module, {"sparsity": 0.5, "calibration": str(path)}, held_out)
    torch.testing.assert_close(out, rsparse_reference(held_out, weight, None, found.channels, found.rank),
                               rtol=1e-4, atol=1e-4)
    assert found.rank > 0
    assert f"share: {found.share:g} x1; rank {found.rank}..{found.rank}; mean output error" in wina_fx.last_report().notes[0]

    # threshold selection: the sparse part's kept fraction follows the calibrated threshold
    options = {"sparsity": 0.5, "calibration": calibration, "selection": "threshold", "measure": True}
    _compile(module, options, tokens)
    row = wina_fx.last_report().row("proj")
    searched = rsparse.search(weight, calibration.samples["proj"].float(), 0.5, threshold_for=lambda s: calibration.threshold("proj", s))
    assert abs(row.measured_sparsity - searched.channel_sparsity(96)) < 0.02


@pytest.mark.parametrize("share", [0, 1.5, -0.2, "fast", True, None, float("nan")])
def test_bad_share_is_refused_naming_the_valid_choices(share):
    with pytest.raises(ValueError, match=r"option 'rsparse_share' must be 'search' or a float in \(0, 1\]"):
        wina_fx.WinaConfig.from_options({"method": "rsparse", "rsparse_share": share})


def test_search_needs_an_rsparse_calibration_before_any_tracing():
    with pytest.raises(ValueError, match=r"calibrate\(model, inputs, method='rsparse'\)"):
        wina_fx.WinaConfig.from_options({"method": "rsparse", "sparsity": 0.5})
    module = Spectral(torch.randn(8, 12))
    teal = wina_fx.calibrate(module, [torch.randn(4, 12)], method="teal", progress=False)
    with pytest.raises(ValueError, match="method='rsparse'"):
        wina_fx.WinaConfig.from_options({"method": "rsparse", "calibration": teal})
    before = wina_fx.reports()[-1:]
    with pytest.raises(ValueError, match="rsparse_share"):
        torch.compile(module, backend="wina", options={"method": "rsparse", "rsparse_share": 2})(torch.randn(2, 12))
    assert wina_fx.reports()[-1:] == before  # refused before any pass looked at the graph
