"""Linears in other forms than F.linear: GPT-2's Conv1D (addmm, W stored (in, out)) and
Falcon's ``x @ W.T``.  Each projection is found, named after its module, and sparsified."""
import pytest
import torch
import transformers

import wina_fx
from tiny_models import masked_input_hooks


def _model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)
        return transformers.GPT2LMHeadModel(config).eval()
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                                       new_decoder_architecture=False)
    return transformers.FalconForCausalLM(config).eval()


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
    (one output -> sigmoid) stays dense with the reason 'router'; the rest are sparsified;
    the expert weights, not rewritten yet, are reported dense."""
    model = _moe(family)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    torch._dynamo.reset()
    out = torch.compile(model, backend="wina", options={"sparsity": 0.0, "inductor": False})(ids).logits
    torch.testing.assert_close(out, model(ids).logits, rtol=0, atol=0)
    report = wina_fx.last_report()
    assert sorted(r.name for r in report.rows if r.status.startswith("dense: router")) == sorted(routers)
    assert {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"} <= {r.name for r in report.sparse_rows}
    # no silent gaps: the experts' 3-D weights (read by a grouped matmul) are rows too, dense
    experts = [r for r in report.rows if ".experts." in r.name]
    assert sorted(r.name for r in experts) == ["model.layers.0.mlp.experts.down_proj",
                                               "model.layers.0.mlp.experts.gate_up_proj"]
    assert all(r.status.startswith("dense: not a linear this backend rewrites (read by ") for r in experts)
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(r.in_features * r.out_features for r in experts) == expert_params
    assert "sparse linears hold" in report.summary()
    torch._dynamo.reset()
