"""The sibling-grouping pass: linears reading one input merged into one grouped op."""
import copy

import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from tiny_models import tiny_model
from wina_fx.kernels import reference
from wina_fx.methods import channel_scores
from wina_fx.passes import Gate, KeepRule, find_linears, gate_linears
from wina_fx.passes.group import group_sibling_linears


class Siblings(torch.nn.Module):
    """Four linears on x (q/k/v/extra, mixed bias), two on h, one alone on z."""

    def __init__(self, k=24, sizes=(16, 8, 8, 5), bias=(True, False, True, False)):
        super().__init__()
        self.on_x = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=b) for n, b in zip(sizes, bias))
        self.gate = torch.nn.Linear(k, 12, bias=False)
        self.up = torch.nn.Linear(k, 12, bias=False)
        self.alone = torch.nn.Linear(12, k)

    def forward(self, x):
        outs = [layer(x) for layer in self.on_x]
        h = torch.tanh(x)
        z = self.gate(h) * self.up(h)
        return torch.cat(outs, -1).sum(-1, keepdim=True) + self.alone(z)


def _thresholds(module, x, gm, sites, sparsity):
    """Gates with a threshold dropping about `sparsity` of each linear's input channels."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: inputs.__setitem__(name, a[0]))
             for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
    module(x)
    for h in hooks:
        h.remove()
    gates = {}
    for i, site in enumerate(sites):
        score = channel_scores("wina", site.weight)
        imp = reference.importance(inputs[site.name], score).flatten()
        gates[i] = Gate(score, KeepRule(threshold=imp.quantile(sparsity).item() if sparsity > 0 else -float("inf"),
                                        sparsity=sparsity + 0.01 * i))  # distinct hints: the group takes the lowest
    return gates


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), sparsity=st.sampled_from([0.0, 0.3, 0.6, 0.9]), lead=st.integers(1, 3))
def test_grouping_keeps_every_output(seed, sparsity, lead):
    torch.manual_seed(seed)
    module = Siblings().eval()
    x = torch.randn(lead, 5, 24)
    gm = fx.symbolic_trace(module)
    sites = find_linears(gm)
    gate_linears(gm, _thresholds(module, x, gm, sites, sparsity), sites)
    separate = copy.deepcopy(gm)
    groups = group_sibling_linears(gm)
    assert [len(g) for g in groups] == [3, 2]  # q/k/v-like (4th member left alone: at most 3), gate/up
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.wina.threshold_linear_group.default) == 2
    hints = [n.args[-1] for n in gm.graph.nodes if n.target is torch.ops.wina.threshold_linear_group.default]
    assert hints == [sparsity, sparsity + 0.04]  # sites 0-2 (q/k/v-like), then 4-5 (gate/up)
    assert ops.count(torch.ops.wina.threshold_linear.default) == 2  # the 4th on x, and alone
    with torch.no_grad():
        torch.testing.assert_close(gm(x), separate(x), rtol=1e-5, atol=1e-5)


def test_grouping_through_dynamo_reads_lifted_parameters():
    """Under torch.compile the weights and biases are graph inputs (Qwen2: q/k/v bias):
    the pass reads them from the example inputs and the logits stay those of the gated graph."""
    model, ids = tiny_model("qwen2", seed=3)
    seen = {}

    def backend(group):
        def compile_fn(gm, example_inputs):
            sites = find_linears(gm, example_inputs)
            gates = {i: Gate(channel_scores("wina", s.weight), KeepRule(threshold=0.05))
                     for i, s in enumerate(sites) if s.problem is None and not s.is_output_head}
            gate_linears(gm, gates, sites)
            if group:
                seen["groups"] = group_sibling_linears(gm, example_inputs)
            return gm.forward
        return compile_fn

    with torch.no_grad():
        separate = torch.compile(model, backend=backend(False), fullgraph=True)(ids).logits
        torch._dynamo.reset()
        grouped = torch.compile(model, backend=backend(True), fullgraph=True)(ids).logits
        torch._dynamo.reset()
    assert sorted(len(g) for g in seen["groups"]) == [2, 2, 3, 3]  # per layer: q/k/v and gate/up
    torch.testing.assert_close(grouped, separate, rtol=1e-4, atol=1e-4)


def test_top_k_linears_are_left_alone():
    module = Siblings().eval()
    gm = fx.symbolic_trace(module)
    sites = find_linears(gm)
    gate_linears(gm, {i: Gate(channel_scores("teal", s.weight), KeepRule(k=4)) for i, s in enumerate(sites)}, sites)
    before = [n.target for n in gm.graph.nodes]
    assert group_sibling_linears(gm) == []
    assert [n.target for n in gm.graph.nodes] == before
