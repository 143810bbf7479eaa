"""The passes on their own, on GraphModules from torch.fx.symbolic_trace."""
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from wina_fx.kernels import reference
from wina_fx.methods import channel_scores
from wina_fx.passes import Gate, KeepRule, find_linears, gate_linears


class Forms(torch.nn.Module):
    """One linear of each recognised form, plus one whose weight is computed."""

    def __init__(self, k=12, n=8):
        super().__init__()
        self.proj = torch.nn.Linear(k, n)
        self.w_t = torch.nn.Parameter(torch.randn(n, k))  # used as x @ w_t.t()
        self.w_kn = torch.nn.Parameter(torch.randn(k, n))  # used as x @ w_kn
        self.scaled = torch.nn.Parameter(torch.randn(n, k))  # weight computed in the graph

    def forward(self, x):
        a = self.proj(x)
        b = x @ self.w_t.t()
        c = torch.matmul(x, self.w_kn)
        d = torch.nn.functional.linear(x, self.scaled * 2)
        return a + b + c + d


def test_find_linears_recognises_each_form_and_reports_computed_weights():
    gm = fx.symbolic_trace(Forms())
    sites = find_linears(gm)
    by_name = {s.name: s for s in sites}
    assert set(by_name) == {"proj", "w_t", "w_kn", "linear"}
    assert by_name["proj"].problem is None and by_name["proj"].node.op == "call_module"
    assert by_name["w_t"].problem is None and by_name["w_t"].weight.shape == (8, 12)
    assert by_name["w_kn"].weight_is_transposed and by_name["w_kn"].weight.shape == (8, 12)
    assert by_name["linear"].problem == "weight is computed in the graph, not a parameter"


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), keep=st.integers(0, 12), lead=st.integers(1, 4))
def test_gate_pass_computes_masked_linears_and_keeps_other_nodes(seed, keep, lead):
    torch.manual_seed(seed)
    module = Forms()
    gm = fx.symbolic_trace(module)
    sites = find_linears(gm)
    gates = {
        i: Gate(channel_scores("wina", s.weight), KeepRule(k=keep))
        for i, s in enumerate(sites)
        if s.problem is None
    }
    untouched = {n.name for n in gm.graph.nodes} - {sites[i].node.name for i in gates}
    gate_linears(gm, gates, sites)
    assert untouched <= {n.name for n in gm.graph.nodes}
    x = torch.randn(lead, 12)

    def masked(w, b=None):
        return reference.masked_linear(x, w, b, reference.topk_mask(x, channel_scores("wina", w), keep))

    expected = (
        masked(module.proj.weight, module.proj.bias)
        + masked(module.w_t)
        + masked(module.w_kn.t())
        + torch.nn.functional.linear(x, module.scaled * 2)
    )
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    if keep == 12:  # keeping every channel is the original function
        torch.testing.assert_close(gm(x), module(x), rtol=1e-5, atol=1e-5)


def test_module_names_read_the_same_whatever_local_dynamo_roots_them_at():
    # transformers >= 5.24 wraps forward in a decorator taking *args, so dynamo roots the
    # model at L['args'][0] instead of L['self']; the names must not change with it.
    from wina_fx.passes.find_linears import _normalise_module_path, _parameter_name

    for root in ("L['self']", "L['args'][0]", "L['fn']"):
        assert _normalise_module_path(f"{root}.model.layers[3].mlp") == "model.layers.3.mlp"
        assert _normalise_module_path(f"{root}._modules['model']._modules['layers']['3']") == "model.layers.3"
    for root in ("l_self", "l_args_0", "l_fn"):
        node = fx.Graph().placeholder(f"{root}_modules_model_modules_layers_modules_3_modules_mlp_parameters_weight_")
        assert _parameter_name(node) == "model.layers.3.mlp.weight"
