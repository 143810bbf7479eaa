"""Linears in other forms than F.linear: GPT-2's Conv1D (addmm, W stored (in, out)) and
Falcon's ``x @ W.T``.  Each projection is found, named after its module, and sparsified."""
import pytest
import torch
import transformers

import wina_fx
from tiny_models import masked_input_hooks
from zoo_models import build as _model


@pytest.mark.parametrize("family, projections", [
    ("gpt2", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    ("falcon", ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"]),
])
@torch.no_grad()
def test_every_projection_is_sparsified(family, projections):
    model = _model(family)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    dense = model(ids).logits
    for sparsity in (0.0, 0.5):
        torch._dynamo.reset()
        out = torch.compile(model, backend="wina", options={"sparsity": sparsity, "inductor": False})(ids).logits
        report = wina_fx.last_report()
        prefix = "transformer.h"
        assert sorted(r.name for r in report.sparse_rows) == sorted(
            f"{prefix}.{layer}.{p}" for layer in range(2) for p in projections)
        assert [r.status for r in report.rows if r.name == "lm_head"] == ["dense: output head (logits projection)"]
        if sparsity == 0:
            torch.testing.assert_close(out, dense, rtol=0, atol=0)
        else:
            hooks = masked_input_hooks(model, sparsity)
            expected = model(ids).logits
            for h in hooks:
                h.remove()
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _moe(family):
    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, num_experts_per_tok=2)
    if family == "mixtral":
        return transformers.MixtralForCausalLM(transformers.MixtralConfig(**common, num_local_experts=4)).eval()
    config = transformers.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=64)
    return transformers.Qwen2MoeForCausalLM(config).eval()


@pytest.mark.parametrize("family, routers", [
    ("mixtral", ["model.layers.0.mlp.gate"]),
    ("qwen2_moe", ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"]),
])
@torch.no_grad()
def test_routers_stay_dense(family, routers):
    """A linear whose output selects experts (softmax -> top-k) or gates a shared expert
    (one output -> sigmoid) stays dense with the reason 'router'; the rest are sparsified,
    each expert of the 3-D expert weights a row of its own."""
    model = _moe(family)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    out = torch.compile(model, backend="wina", options={"sparsity": 0.0, "inductor": False})(ids).logits
    torch.testing.assert_close(out, model(ids).logits, rtol=0, atol=0)
    report = wina_fx.last_report()
    assert sorted(r.name for r in report.rows if r.status.startswith("dense: router")) == sorted(routers)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"} <= {r.name for r in report.sparse_rows}
    # no silent gaps: every expert of the 3-D expert weights is a row, sparse
    experts = [r for r in report.rows if ".experts." in r.name]
    assert sorted(r.name for r in experts) == sorted(f"model.layers.0.mlp.experts.{w}.{e}"
                                                     for w in ("gate_up_proj", "down_proj") for e in range(4))
    assert all(r.status.startswith("sparse") for r in experts)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(r.in_features * r.out_features for r in experts) == expert_params
    assert "sparse linears hold" in report.summary()
    torch._dynamo.reset()


def _masked_experts_forward(experts, sparsity):
    """Eager reference of top-k WINA on the experts: token by token, each routed copy of a
    token is masked by the top-k of |x_i| * ||W_e[:, i]|| of its expert e, before the
    gate/up and before the down projection."""
    from wina_fx.kernels import reference
    from wina_fx.methods import keep_count

    def forward(hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for t in range(hidden.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                x, w1, w2 = hidden[t], experts.gate_up_proj[e], experts.down_proj[e]
                x = x * reference.topk_mask(x, w1.norm(dim=0), keep_count(w1.shape[1], sparsity))
                gate, up = torch.nn.functional.linear(x, w1).chunk(2, dim=-1)
                h = experts.act_fn(gate) * up
                h = h * reference.topk_mask(h, w2.norm(dim=0), keep_count(w2.shape[1], sparsity))
                out[t] += torch.nn.functional.linear(h, w2) * top_k_weights[t, j]
        return out
    return forward


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
@torch.no_grad()
def test_experts_are_sparse_per_routed_expert(family, implementation):
    """Top-k at 50 %: the compiled model (Inductor) equals an eager model whose linears are
    masked by hooks and whose experts mask each routed copy of a token by its expert's
    column norms; the router stays dense.  Both expert implementations of transformers."""
    model = _moe(family)
    model.config._experts_implementation = implementation
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    out = torch.compile(model, backend="wina", options={"sparsity": 0.5, "measure": True})(ids).logits
    report = wina_fx.last_report()
    measured = [r.measured_sparsity for r in report.sparse_rows if ".experts." in r.name and r.counts[1] > 0]
    assert measured and all(abs(m - 0.5) < 0.02 for m in measured), measured
    assert any("expert ops masked" in n for n in report.notes), report.notes
    experts = model.model.layers[0].mlp.experts
    hooks = masked_input_hooks(model, 0.5, skip=("model.layers.0.mlp.shared_expert_gate",))
    experts.forward = _masked_experts_forward(experts, 0.5)
    try:
        expected = model(ids).logits
    finally:
        del experts.forward
        for h in hooks:
            h.remove()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@torch.no_grad()
def test_experts_calibrate_per_expert(implementation):
    """Calibration keeps statistics per expert over the rows routed to it: each gate/up
    expert's median importance is the median of |x_i| * ||W_e[:, i]|| over the tokens the
    router sent to e (recorded eagerly by a hook), and on the calibration tokens every
    expert then drops its target share."""
    model = _moe("mixtral")
    model.config._experts_implementation = implementation
    experts = model.model.layers[0].mlp.experts
    ids = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(4))
    routed = {}
    hook = experts.register_forward_pre_hook(lambda m, args: routed.update(x=args[0], index=args[1]))
    model(ids)
    hook.remove()
    calibration = wina_fx.calibrate(model, [ids], progress=False)
    for e in range(4):
        rows = routed["x"][(routed["index"] == e).any(dim=-1)]
        importance = rows.abs() * experts.gate_up_proj[e].norm(dim=0)
        expected = importance.flatten().double().quantile(0.5).item()
        assert calibration.threshold(f"model.layers.0.mlp.experts.gate_up_proj.{e}", 0.5) == pytest.approx(expected,
                                                                                                           rel=1e-5)
    torch._dynamo.reset()
    options = {"sparsity": {"*.experts.gate_up_proj.*": 0.5}, "selection": "threshold", "calibration": calibration,
               "measure": True}
    torch.compile(model, backend="wina", options=options)(ids)
    rows = wina_fx.last_report().sparse_rows
    assert len(rows) == 4 and all(abs(r.measured_sparsity - 0.5) < 0.01 for r in rows), \
        [(r.name, r.measured_sparsity) for r in rows]
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("implementation, tokens, selection", [
    ("grouped_mm", 1, "threshold"), ("grouped_mm", 1, "topk"), ("batched_mm", 1, "threshold"),
    ("grouped_mm", 11, "topk"), ("batched_mm", 11, "threshold")])  # each an Inductor compile on the GPU
@torch.no_grad()
def test_experts_on_cuda_match_the_cpu(implementation, tokens, selection):
    """bf16 Mixtral through Inductor on CUDA, three calls, against the op-by-op CPU graph of
    the same model at 50 %: at one token the expert ops run as the sparse expert GEMV kernel
    (top-k masks x first), at eleven the input of torch's grouped_mm / bmm is masked."""
    model = _moe("mixtral").to(torch.bfloat16)
    model.config._experts_implementation = implementation
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(5))
    options = {"sparsity": 0.5, "selection": selection}
    if selection == "threshold":
        calibration_ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(6))
        options["calibration"] = wina_fx.calibrate(model, [calibration_ids], progress=False)
    torch._dynamo.reset()
    expected = torch.compile(model, backend="wina", options={**options, "inductor": False})(ids).logits.float()
    torch._dynamo.reset()
    gpu = model.cuda()
    try:
        step = torch.compile(gpu, backend="wina", options=options)
        outs = [step(ids.cuda()).logits.float().cpu() for _ in range(3)]
        notes = " ".join(wina_fx.last_report().notes)
        assert ("run as wina::expert_threshold_linear" in notes) == (tokens == 1), notes
    finally:
        model.cpu()
        torch._dynamo.reset()
    for out in outs:
        assert ((out - expected).norm() / expected.norm()).item() < 2e-2


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("implementation", ["grouped_mm", "batched_mm"])
@torch.no_grad()
def test_decode_sized_expert_ops_become_one_sparse_op(implementation, selection, monkeypatch):
    """With the backend's CUDA decisions taken on the CPU (``kernels_read_rows`` patched):
    the expert weights are stored with each W_e^T contiguous, in place and bit for bit; a
    one-token step (2 routed rows) runs each expert op as ``wina::expert_threshold_linear``
    (no gathered copy of whole experts left in the graph) and gives what the masked op
    gives; the model used eagerly afterwards is unchanged."""
    from wina_fx.passes import weight_layout

    model = _moe("mixtral")
    model.config._experts_implementation = implementation
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(6))
    options = {"sparsity": 0.5, "selection": selection, "inductor": False}
    if selection == "threshold":
        options["calibration"] = wina_fx.calibrate(model, [ids], progress=False)
    one = ids[:, :1]
    torch._dynamo.reset()
    expected = torch.compile(model, backend="wina", options=options)(one).logits
    eager = model(one).logits
    experts = model.model.layers[0].mlp.experts
    values = experts.gate_up_proj.detach().clone()

    monkeypatch.setattr(weight_layout, "kernels_read_rows", lambda weight: True)
    torch._dynamo.reset()
    step = torch.compile(model, backend="wina", options=options)
    outs = [step(one).logits for _ in range(2)]  # the first call re-lays the weights out
    report = wina_fx.last_report()
    monkeypatch.undo()
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert experts.gate_up_proj.transpose(1, 2).is_contiguous() and torch.equal(experts.gate_up_proj, values)
    torch.testing.assert_close(model(one).logits, eager, rtol=1e-6, atol=1e-6)
    assert any("2 expert ops run as wina::expert_threshold_linear" in n for n in report.notes), report.notes
    torch._dynamo.reset()
