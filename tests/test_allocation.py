"""Greedy per-linear sparsity allocation (wina_fx.allocation): targets met, sensitive linears
spared, blocks found on the FX graph, saved with the calibration, read by the backend."""
import operator

import pytest
import torch
from tiny_models import tiny_model

import wina_fx
from wina_fx.allocation import AllocationRecorder, allocate, block_name, greedy_allocation
from wina_fx.calibration import NUM_QUANTILES

TINY_BATCHES = [torch.randint(0, 96, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The greedy runs thousands of small ops: one thread is faster on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _sizes(model):
    return {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _mean(allocation, sizes, names=None):
    names = list(allocation) if names is None else names
    return sum(allocation[n] * sizes[n] for n in names) / sum(sizes[n] for n in names)


def test_greedy_meets_each_target_per_block_and_model_wide():
    model, _ = tiny_model("llama", seed=1)
    targets = [0.25, 0.5, 0.65]
    allocations = greedy_allocation(model, TINY_BATCHES[:1], "wina", targets, step=0.2, progress=False)
    sizes = _sizes(model)
    assert sorted(allocations) == targets
    for target, allocation in allocations.items():
        assert len(allocation) == 14 and "lm_head" not in allocation  # the output head stays dense
        assert all(0.0 <= s < 1.0 for s in allocation.values())
        for layer in ("model.layers.0", "model.layers.1"):
            block = [n for n in allocation if n.startswith(layer + ".")]
            assert len(block) == 7
            assert abs(_mean(allocation, sizes, block) - target) <= 0.01
        assert abs(_mean(allocation, sizes) - target) <= 0.01
        assert max(allocation.values()) - min(allocation.values()) > 0.1  # not uniform
    # one path: a larger target never lowers a linear's sparsity
    for name in allocations[0.25]:
        assert allocations[0.25][name] <= allocations[0.5][name] + 1e-9 <= allocations[0.65][name] + 2e-9


class TwoLinearBlock(torch.nn.Module):
    """h = x + a(x * scale_a); out = h + b(h * scale_b). The input scales make one linear's
    input flat (every channel matters: its error grows fast with sparsity) and the other's
    spiky (a few large channels carry it: dropping the rest costs almost nothing)."""

    def __init__(self, dim: int, sensitive: str):
        super().__init__()
        self.a = torch.nn.Linear(dim, dim, bias=False)
        self.b = torch.nn.Linear(dim, dim, bias=False)
        flat = torch.ones(dim)
        spiky = torch.full((dim,), 0.01)
        spiky[:3] = 10.0
        self.register_buffer("scale_a", flat if sensitive == "a" else spiky)
        self.register_buffer("scale_b", flat if sensitive == "b" else spiky)

    def forward(self, x):
        h = x + self.a(x * self.scale_a)
        return h + self.b(h * self.scale_b)


class TwoBlockModel(torch.nn.Module):
    def __init__(self, dim: int, sensitive: str):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList([TwoLinearBlock(dim, sensitive) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("sensitive", ["a", "b"])
def test_greedy_spares_the_linear_whose_error_grows_fastest(sensitive):
    model = TwoBlockModel(32, sensitive)
    inputs = [torch.randn(1, 40, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    allocation = greedy_allocation(model, inputs, "wina", [0.5], step=0.05, progress=False)[0.5]
    insensitive = "b" if sensitive == "a" else "a"
    for layer in ("layers.0", "layers.1"):
        spared, cut = allocation[f"{layer}.{sensitive}"], allocation[f"{layer}.{insensitive}"]
        assert spared + cut == pytest.approx(1.0)  # equal sizes: the mean is the target
        assert spared <= 0.15 and cut >= 0.85, allocation


def test_blocks_outputs_and_dense_replay_on_the_fx_graph():
    model, _ = tiny_model("qwen2", seed=2)
    recorder = AllocationRecorder("teal")
    with torch.no_grad():
        torch.compile(model, backend=recorder)(TINY_BATCHES[0])
    (evaluators, calls), = recorder.graphs
    assert [e.block.name for e in evaluators] == ["model.layers.0", "model.layers.1"]
    for layer, evaluator in enumerate(evaluators):
        block = evaluator.block
        # the output is the residual add after the MLP's down projection
        down = next(s.node for s in block.sites if s.name.endswith("mlp.down_proj"))
        assert block.output.target in (torch.add, operator.add) and down in block.output.args
        if layer:  # the previous block's output is read from the recording, not re-evaluated
            assert evaluators[layer - 1].block.output in block.frontier
        # re-evaluating every node dense from the recorded frontier gives the recorded output
        env = {n: calls[0][n] for n in block.frontier}
        out = evaluator.evaluate(env, block.nodes, [0.0] * len(block.sites))[block.output]
        assert torch.equal(out, calls[0][block.output])
    assert block_name("model.layers.12.mlp.down_proj") == "model.layers.12"
    assert block_name("transformer.h.3.attn.c_attn") == "transformer.h.3"
    assert block_name("lonely") == "lonely"


class ParallelBranches(torch.nn.Module):
    """Two blocks whose linears meet in a concatenation, not a residual add."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"a": torch.nn.Linear(8, 4), "b": torch.nn.Linear(8, 4)}) for _ in range(2)
        )

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([layer["a"](x), layer["b"](x)], dim=-1).relu()
        return x


def test_a_block_without_residual_add_ends_where_all_its_linears_meet():
    recorder = AllocationRecorder("teal")
    with torch.no_grad():
        torch.compile(ParallelBranches(), backend=recorder)(torch.randn(3, 8))
    blocks = [e.block for e in recorder.graphs[0][0]]
    assert [b.name for b in blocks] == ["layers.0", "layers.1"]
    assert all(b.output.target is torch.cat for b in blocks)
    allocation = allocate(recorder, [0.5], step=0.1)[0][0.5]
    assert allocation["layers.0.a"] + allocation["layers.0.b"] == pytest.approx(1.0)


def test_allocation_is_saved_loaded_and_drives_the_backend(tmp_path):
    model, ids = tiny_model("qwen2", seed=4)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    calibration = wina_fx.calibrate(model, TINY_BATCHES, method="wina", progress=False,
                                    allocation_targets=[0.5, 0.4], allocation_step=0.2)
    assert calibration.allocation_targets == [0.4, 0.5]
    path = tmp_path / "tiny.cal"
    calibration.save(path)
    loaded = wina_fx.Calibration.load(path)
    assert loaded.allocations == calibration.allocations
    allocation = loaded.allocation(0.5)
    torch._dynamo.reset()
    options = {"sparsity": 0.5, "sparsity_allocation": "greedy", "calibration": str(path), "measure": True,
               "inductor": False}
    with torch.no_grad():
        out = torch.compile(model, backend="wina", options=options)(ids).logits
    assert torch.isfinite(out).all()
    report = wina_fx.last_report()
    assert {row.name: row.target_sparsity for row in report.sparse_rows} == allocation
    for row in report.sparse_rows:  # top-k keeps round((1 - s) K) channels of every token
        assert abs(row.measured_sparsity - allocation[row.name]) <= 0.5 / row.in_features + 1e-9, row
    assert report.row("lm_head").status.startswith("dense")
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())


def test_orthogonalized_graph_is_allocated_as_the_backend_sees_it():
    model, ids = tiny_model("llama", seed=5)
    recorder = AllocationRecorder("wina", "full")
    with torch.no_grad():
        torch.compile(model, backend=recorder)(TINY_BATCHES[0])
    allocations, paths = allocate(recorder, [0.5], step=0.2)
    sizes = _sizes(model)
    assert abs(_mean(allocations[0.5], sizes) - 0.5) <= 1e-6
    # the prepass rewrote the weights the greedy scored: folded norms and rotations
    evaluator = recorder.graphs[0][0][0]
    q = next(s for s in evaluator.block.sites if s.name.endswith("q_proj"))
    assert not torch.allclose(q.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert paths["model.layers.0"].errors[0] == 0.0 and paths["model.layers.0"].errors[-1] > 0.0


def test_bad_targets_steps_and_methods_fail_clearly():
    model, ids = tiny_model("llama")
    for bad in ([1.0], [-0.1], [0.5, float("nan")], ["0.5"]):
        with pytest.raises(ValueError, match=r"float in \[0, 1\)"):
            wina_fx.calibrate(model, TINY_BATCHES, progress=False, allocation_targets=bad)
    with pytest.raises(ValueError, match="at least one target"):
        wina_fx.calibrate(model, TINY_BATCHES, progress=False, allocation_targets=[])
    with pytest.raises(ValueError, match=r"step must be a float in \(0, 1\)"):
        wina_fx.calibrate(model, TINY_BATCHES, progress=False, allocation_targets=[0.5], allocation_step=0)
    with pytest.raises(ValueError, match="method must be one of 'wina', 'teal'"):
        wina_fx.calibrate(model, TINY_BATCHES, method="cats", progress=False, allocation_targets=[0.5])

    quantiles = torch.linspace(0, 1, NUM_QUANTILES).unsqueeze(0)
    name = "model.layers.0.mlp.down_proj"
    calibration = wina_fx.Calibration("wina", [name], quantiles, {name: ((64, 144), 1.0)}, 24,
                                      allocations={0.5: {name: 0.5}})
    with pytest.raises(ValueError, match=r"no greedy allocation for sparsity 0.3 \(it has: 0.5\)"):
        torch.compile(model, backend="wina", options={"sparsity": 0.3, "sparsity_allocation": "greedy",
                                                      "calibration": calibration})(ids)
    with pytest.raises(ValueError, match="sparsity_allocation='greedy' needs option 'calibration'"):
        wina_fx.WinaConfig.from_options({"sparsity_allocation": "greedy"})
    with pytest.raises(ValueError, match="'uniform', 'greedy'"):
        wina_fx.WinaConfig.from_options({"sparsity_allocation": "teal"})


def test_fast_topk_mask_keeps_the_channels_of_the_reference_rule():
    from wina_fx.allocation import topk_mask
    from wina_fx.kernels import reference

    x = torch.randn(5, 7, 37, generator=torch.Generator().manual_seed(0))
    score = torch.rand(37, generator=torch.Generator().manual_seed(1)) + 0.1
    for k in range(0, 38):
        assert torch.equal(topk_mask(x, score, k), reference.topk_mask(x, score, k)), k


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
def test_experts_are_allocated_per_expert_weight(implementation):
    """Mixtral: the greedy evaluates each expert of the 3-D expert weights as a linear of its
    own (rows masked by their routed expert), its block replay equals the backend's top-k
    model, and the allocation meets the target over attention and experts together."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                        num_experts_per_tok=2, num_local_experts=4)
    model = transformers.MixtralForCausalLM(config).eval()
    model.config._experts_implementation = implementation
    recorder = AllocationRecorder("wina")
    with torch.no_grad():
        torch.compile(model, backend=recorder)(TINY_BATCHES[0])
        (evaluator,), calls = recorder.graphs[0]
        block = evaluator.block
        assert sum(".experts." in s.name for s in block.sites) == 8
        env = {n: calls[0][n] for n in block.frontier}
        hidden = evaluator.evaluate(env, block.nodes, [0.5] * len(block.sites))[block.output]
        replayed = model.lm_head(model.model.norm(hidden))
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="wina", options={"sparsity": 0.5, "inductor": False})
        torch.testing.assert_close(replayed, compiled(TINY_BATCHES[0]).logits, rtol=1e-5, atol=1e-5)
    allocation = allocate(recorder, [0.5])[0][0.5]
    sizes = {s.name: s.in_features * s.out_features for s in block.sites}
    assert set(allocation) == set(sizes) and _mean(allocation, sizes) == pytest.approx(0.5)
    torch._dynamo.reset()
