"""The weight-orthogonalization prepass (passes/orthogonalize/) on dynamo graphs.

Each test captures the dynamo graph with a backend that runs ``orthogonalize`` and then
executes the rewritten FX graph op by op, and compares with eager.
"""
import pytest
import wina_fx
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from tiny_models import FAMILIES, tiny_model

from wina_fx.methods import channel_scores
from wina_fx.passes.find_linears import find_linears
from wina_fx.passes.orthogonalize import REFERENCE_SOURCES, VARIANTS, orthogonalize


def _run(model, *args, variant="full", sources=None, **kwargs):
    """(output, [(report, gm, example_inputs), ...]) of ``model`` compiled through orthogonalize."""
    graphs = []

    def backend(gm, example_inputs, **_):
        report = orthogonalize(gm, example_inputs, variant, sources=sources)
        graphs.append((report, gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*args, **kwargs)
    return out, graphs


def _rel_err(out, ref):
    assert torch.isfinite(out).all()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _source_weights(report, gm, example_inputs):
    """For each group with its own Q: the rows of the transformed weights Q came from."""
    sites = {s.name: s for s in find_linears(gm, example_inputs)}
    for group in report.groups:
        if group.source_rows:
            yield group, torch.cat([sites[name].weight[r0:r1] for name, r0, r1 in group.source_rows])


def _assert_orthogonal_columns(weight, what):
    w = weight.detach().double()
    gram = w.mT @ w
    diagonal = gram.diagonal()
    off = gram - torch.diag(diagonal)
    # relative to the two columns' norms; columns that rotated into W's null space are ~0
    bound = 1e-4 * (diagonal[:, None] * diagonal[None, :]).sqrt() + 1e-6 * diagonal.max()
    worst = (off.abs() / bound).max().item()
    assert worst <= 1, f"{what}: off-diagonal of W^T W up to {worst:.2g} x the bound"


def _parameters(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("family", FAMILIES)
# no shrinking: each example compiles a model, and the failing example is printed as drawn
@settings(max_examples=3, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    hidden=st.sampled_from([32, 48, 64, 96]),
    layers=st.integers(1, 3),
    reference=st.booleans(),
)
def test_full_transform_keeps_logits_and_makes_source_columns_orthogonal(family, seed, hidden, layers, reference):
    model, ids = tiny_model(family, seed, hidden=hidden, layers=layers)
    before = _parameters(model)
    with torch.no_grad():
        expected = model(ids).logits
    sources = REFERENCE_SOURCES if reference else None
    out, graphs = _run(model, ids, sources=sources)
    assert len(graphs) == 1
    report, gm, example_inputs = graphs[0]
    assert report.applied, report.reason
    assert _rel_err(out.logits, expected) < 1e-4
    assert len(report.norms_folded) == 2 * layers + 1
    assert report.shortcut_rotations == 2 * layers - 1 and report.input_rotations == 0
    checked = 0
    for group, weight in _source_weights(report, gm, example_inputs):
        _assert_orthogonal_columns(weight, group.source)
        checked += 1
    # every attention input has its own Q; MLP inputs too with the reference sources
    assert checked == (2 * layers if reference else layers)
    if reference:  # the k_proj / gate_proj weights (or their rows in qkv / gate_up) are column-orthogonal
        kinds = {group.source.rsplit(".", 1)[-1].split("[")[0] for group in report.groups if group.source}
        assert kinds == ({"qkv_proj", "gate_up_proj"} if family == "phi3" else {"k_proj", "gate_proj"})
        if family == "phi3":
            assert all("[" in group.source for group in report.groups if group.source)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_keeps_logits_and_costs_what_it_says(family, variant):
    layers = 3
    model, ids = tiny_model(family, seed=7, hidden=64, layers=layers)
    with torch.no_grad():
        expected = model(ids).logits
    out, [(report, gm, _)] = _run(model, ids, variant=variant)
    assert report.applied, report.reason
    assert _rel_err(out.logits, expected) < 1e-4
    # full: attention stretches rotated, MLP stretches not (default sources): a rotation at every
    # add but the last; local: one input rotation per attention input; shared: none
    rotations = {"full": 2 * layers - 1, "local": layers, "shared": 0}[variant]
    assert report.rotations == rotations
    assert report.input_rotations == (rotations if variant == "local" else 0)
    assert report.rotation_parameters == rotations * 64 * 64
    assert report.rotation_flops_per_token == 2 * rotations * 64 * 64
    assert report.rotation_bytes_per_token == 4 * rotations * 64 * 64
    nodes = [n for n in gm.graph.nodes if n.meta.get("wina_orthogonalize") in ("shortcut rotation", "input rotation")]
    assert len(nodes) == rotations
    # the rotations are not linears: no pass may gate them
    assert all(site.node not in nodes for site in find_linears(gm))
    assert any("run-time rotations" in note for note in report.notes)
    assert len(report.norms_folded) == (layers if variant == "local" else 2 * layers + 1)
    if variant == "local":  # only the attention inputs changed: no copies of embedding, head, writers
        assert report.writers == [] and report.untied_bytes == 0


def test_local_gives_the_attention_inputs_what_full_gives_them():
    # 4 layers: a freed Q could once hand its cache slot to a later layer's
    model, ids = tiny_model("phi3", seed=5, layers=4)
    with torch.no_grad():
        expected = model(ids).logits
    weights = {}
    for variant in ("full", "local"):
        out, [(report, gm, example_inputs)] = _run(model, ids, variant=variant)
        assert _rel_err(out.logits, expected) < 1e-4
        weights[variant] = {s.name: s.weight for s in find_linears(gm, example_inputs)}
    for layer in range(4):
        name = f"model.layers.{layer}.self_attn.qkv_proj"
        assert torch.equal(weights["full"][name], weights["local"][name]), name
    lm_head = weights["local"]["lm_head"]
    assert lm_head is model.lm_head.weight  # the head is left alone by "local"


def test_identity_source_leaves_that_input_unrotated():
    model, ids = tiny_model("qwen2", seed=2, layers=2)
    with torch.no_grad():
        expected = model(ids).logits
    out, [(report, gm, example_inputs)] = _run(model, ids, sources={"attention": "k_proj", "mlp": "identity"})
    assert _rel_err(out.logits, expected) < 1e-4
    mlp = [g for g in report.groups if g.role == "mlp"]
    assert [g.source for g in mlp] == ["identity (not rotated)"] * 2
    # an unrotated MLP input reads W diag(g): the norm's scale folded, nothing else
    sites = {s.name: s for s in find_linears(gm, example_inputs)}
    up = model.model.layers[0].mlp.up_proj.weight * model.model.layers[0].post_attention_layernorm.weight
    torch.testing.assert_close(sites["model.layers.0.mlp.up_proj"].weight, up)
    # o_proj writes into that unrotated stretch: it keeps the user's parameter
    o_proj = sites["model.layers.0.self_attn.o_proj"]
    assert o_proj.weight_node.op == "placeholder" and o_proj.weight is model.model.layers[0].self_attn.o_proj.weight
    # down_proj writes into the next layer's attention stretch, which is rotated
    assert sites["model.layers.0.mlp.down_proj"].weight_node.op == "get_attr"


def test_gated_linears_read_the_transformed_weights():
    model, ids = tiny_model("mistral", seed=4)
    _, [(report, gm, example_inputs)] = _run(model, ids, sources=REFERENCE_SOURCES)
    sites = find_linears(gm, example_inputs)
    assert len(sites) == 2 * 7 + 1
    for site in sites:
        # every linear weight is a new constant: readers W Q, writers Q^T W, head W diag(g) Q
        assert site.weight_node.op == "get_attr", site.name
        assert site.problem is None
    k = next(s for s in sites if s.name == "model.layers.0.self_attn.k_proj")
    original = model.model.layers[0].self_attn.k_proj.weight
    assert not torch.allclose(channel_scores("wina", k.weight), channel_scores("wina", original))
    # o_proj and down_proj are rotated on their output side only: W^T W, hence WINA's scores, unchanged
    for kind in ("self_attn.o_proj", "mlp.down_proj"):
        site = next(s for s in sites if s.name == f"model.layers.1.{kind}")
        original = model.get_submodule(f"model.layers.1.{kind}").weight
        torch.testing.assert_close(channel_scores("wina", site.weight), channel_scores("wina", original))
    untouched = dict(report.untouched)
    assert "v_proj" in untouched["model.layers.0.self_attn.o_proj"]
    assert "elementwise product" in untouched["model.layers.0.mlp.down_proj"]


def test_smollm2_real_weights(smollm2):
    model, tokenizer = smollm2
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = tokenizer("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
                    "must be in want of a wife.", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
    out, [(report, gm, example_inputs)] = _run(model, ids, sources=REFERENCE_SOURCES, use_cache=False)
    assert report.applied, report.reason
    assert _rel_err(out.logits, expected) < 1e-4
    assert len(report.norms_folded) == 61 and report.shortcut_rotations == 59
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    assert report.untied_bytes == vocab * hidden * 4  # lm_head was tied to embed_tokens
    assert any("untied" in note for note in report.notes)
    assert report.rotation_bytes_per_token == 59 * hidden * hidden * 4
    weights = sum(p.numel() for n, p in model.named_parameters() if "proj" in n) + vocab * hidden
    assert report.linear_weight_bytes == 4 * weights
    for group, weight in _source_weights(report, gm, example_inputs):
        _assert_orthogonal_columns(weight, group.source)
    # k_proj (192 x 576) has rank 192: rotated by its own V, 384 of its columns vanish
    k = next(s for s in find_linears(gm, example_inputs) if s.name == "model.layers.3.self_attn.k_proj")
    assert (k.weight.norm(dim=0) < 1e-5 * k.weight.norm(dim=0).max()).sum() == hidden - k.weight.shape[0]
    after = dict(model.named_parameters())
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied in the user's model


def test_recompiles_reuse_the_transformed_weights():
    model, ids = tiny_model("llama", seed=1)
    with torch.no_grad():
        expected = [model(ids).logits, model(ids[:, :5]).logits]
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append((orthogonalize(gm, example_inputs), gm))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        outs = [compiled(ids).logits, compiled(ids[:, :5]).logits]
    assert len(graphs) == 2 and all(report.applied for report, _ in graphs)
    for out, ref in zip(outs, expected):
        assert _rel_err(out, ref) < 1e-4
    first, second = ({name: b.data_ptr() for name, b in gm.named_buffers()} for _, gm in graphs)
    assert first and first == second  # one copy of the transformed weights for both graphs


class _RMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * x.to(dtype)


class _Toy(torch.nn.Module):
    """A two-block residual MLP transformer; ``leak`` makes the final norm's output also
    feed a sum, ``layernorm`` uses LayerNorm instead of RMSNorm."""

    def __init__(self, d=16, vocab=24, leak=False, layernorm=False):
        super().__init__()
        norm = (lambda: torch.nn.LayerNorm(d)) if layernorm else (lambda: _RMSNorm(d))
        self.embed = torch.nn.Embedding(vocab, d)
        self.norms = torch.nn.ModuleList([norm() for _ in range(2)])
        self.ups = torch.nn.ModuleList([torch.nn.Linear(d, 3 * d) for _ in range(2)])
        self.downs = torch.nn.ModuleList([torch.nn.Linear(3 * d, d) for _ in range(2)])
        self.final = norm()
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.leak = leak

    def forward(self, ids):
        h = self.embed(ids)
        for norm, up, down in zip(self.norms, self.ups, self.downs):
            h = h + down(torch.nn.functional.gelu(up(norm(h))))
        n = self.final(h)
        logits = self.head(n)
        return logits + n.sum(-1, keepdim=True) if self.leak else logits


def _assert_graph_unchanged(report, gm, code_before, buffers_before):
    assert not report.applied
    assert gm.code == code_before
    assert [name for name, _ in gm.named_buffers()] == buffers_before
    assert report.notes == [f"orthogonalize: graph left unchanged: {report.reason}"]


def _run_unchanged(model, *args, **kwargs):
    graphs = []

    def backend(gm, example_inputs, **_):
        code, buffers = gm.code, [name for name, _ in gm.named_buffers()]
        graphs.append((orthogonalize(gm, example_inputs), gm, code, buffers))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(*args, **kwargs)
    return out, graphs


def test_own_residual_model_is_transformed_and_a_norm_feeding_a_non_linear_is_not():
    torch.manual_seed(0)
    ids = torch.randint(0, 24, (2, 7))
    model = _Toy()
    with torch.no_grad():
        expected = model(ids)
    out, [(report, gm, _)] = _run(model, ids)
    assert report.applied and _rel_err(out, expected) < 1e-4
    assert report.groups[0].role == "other" and report.groups[0].source.startswith("stack(")

    leaky = _Toy(leak=True)
    with torch.no_grad():
        expected = leaky(ids)
    out, [(report, gm, code, buffers)] = _run_unchanged(leaky, ids)
    _assert_graph_unchanged(report, gm, code, buffers)
    assert "RMSNorm" in report.reason and "not only linears" in report.reason
    assert torch.equal(out, expected)


def test_structures_that_are_not_residual_rmsnorm_transformers_are_left_alone():
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    _, [(report, gm, code, buffers)] = _run_unchanged(mlp, torch.randn(3, 8))
    _assert_graph_unchanged(report, gm, code, buffers)
    assert "no token embedding" in report.reason

    ids = torch.randint(0, 24, (2, 7))
    _, [(report, gm, code, buffers)] = _run_unchanged(_Toy(layernorm=True), ids)
    _assert_graph_unchanged(report, gm, code, buffers)
    assert "LayerNorm" in report.reason

    # a graph that returns the residual stream itself (hidden states) cannot be rotated
    model, ids = tiny_model("llama", seed=0)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True)
    out, graphs = _run_unchanged(model, ids, output_hidden_states=True)
    for report, gm, code, buffers in graphs:
        _assert_graph_unchanged(report, gm, code, buffers)
    assert any("returns the residual stream" in report.reason for report, *_ in graphs)
    assert torch.equal(out.logits, expected.logits)


def test_bad_variant_and_sources_fail_clearly():
    model, ids = tiny_model("llama")
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="variant must be one of 'full', 'local', 'shared'"):
        orthogonalize(gm, None, "fast")
    with pytest.raises(ValueError, match="sources maps"):
        orthogonalize(gm, None, sources={"ffn": "gate_proj"})


# --------------------------------------------------------------------------- through the backend


def _compile_wina(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="wina", options={"inductor": False, **options})


@pytest.mark.parametrize("family", FAMILIES)
def test_backend_option_keeps_dense_logits_and_gates_the_rotated_weights(family):
    model, ids = tiny_model(family, seed=3, layers=2)
    before = _parameters(model)
    with torch.no_grad():
        expected = model(ids).logits
        out = _compile_wina(model, orthogonalize=True, sparsity=0.0)(ids).logits
    assert _rel_err(out, expected) < 1e-4
    report = wina_fx.last_report()
    assert report.orthogonalize is not None and report.orthogonalize.applied
    assert any("run-time rotations" in note for note in report.notes)
    assert "note: orthogonalize" in report.summary()
    assert len(report.sparse_rows) == 2 * (4 if family == "phi3" else 7)
    _assert_unchanged(model, before)
    # sparse at 50%: differs from the dense output, but stays finite and close-ish
    with torch.no_grad():
        sparse = _compile_wina(model, orthogonalize="local", sparsity=0.5)(ids).logits
    assert 1e-4 < _rel_err(sparse, expected) < 1.0


def test_calibration_records_the_prepass_and_must_match_the_option():
    model, ids = tiny_model("llama", seed=6, layers=2)
    calibration = wina_fx.calibrate(model, [ids], method="wina", orthogonalize=True, progress=False)
    assert calibration.orthogonalize == "full"
    compiled = _compile_wina(model, orthogonalize=True, sparsity=0.5, selection="threshold",
                             calibration=calibration, measure=True)
    with torch.no_grad():
        compiled(ids)
    measured = [row.measured_sparsity for row in wina_fx.last_report().sparse_rows]
    # the thresholds were measured on these very tokens, after the same prepass
    assert measured and all(abs(m - 0.5) < 0.05 for m in measured), measured
    with pytest.raises(ValueError, match="measured with orthogonalize='full', but option 'orthogonalize' is None"):
        wina_fx.WinaConfig.from_options({"selection": "threshold", "calibration": calibration})


def test_symbolic_shapes_are_transformed_too():
    # dynamo's dynamic-shape graphs add x.size() users and read eps with .item(); a recompile
    # for a new length must not silently lose the prepass
    model, ids = tiny_model("qwen2", seed=8, layers=2)
    graphs = []

    def backend(gm, example_inputs, **_):
        graphs.append(orthogonalize(gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=True)
    with torch.no_grad():
        for length in (11, 7):
            assert _rel_err(compiled(ids[:, :length]).logits, model(ids[:, :length]).logits) < 1e-4
    assert graphs and all(report.applied for report in graphs), [r.reason for r in graphs]
