"""Option recipe="paper": WINA and TEAL as the WINA paper's code ran them, against an eager
re-implementation written from that description (forward pre-hooks, no graph passes)."""
import pytest
import torch

import wina_fx
from tiny_models import tiny_model
from wina_fx.kernels import reference
from wina_fx.methods import keep_count

SPARSITY = 0.5


def _model(family: str):
    """A tiny model whose k_proj (and k rows of a fused qkv_proj) and gate_proj have full
    column rank (as many key/value heads as heads): their right singular vectors are then
    unique up to sign, which |x| ignores (in a null space the paper's basis is arbitrary)."""
    return tiny_model(family, seed=21, kv_heads=4)


def _right_vectors(weight: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(weight.double(), full_matrices=False).Vh.mT  # (K, K): full column rank


def _prefix_mask(mask: torch.Tensor) -> torch.Tensor:
    """The first T - int(0.99 T) positions of each sequence keep every channel."""
    positions = mask.shape[-2]
    first = positions - int(0.99 * positions)
    mask = mask.clone()
    mask[..., :first, :] = True
    return mask


def _paper_hooks(model, method: str) -> list:
    """Pre-hooks masking each linear's input as the paper recipe does, in the original basis:
    a reader of a norm (scale g) whose rotation is Q sees x~ = (x / g) Q; it keeps the top k
    of |x~_i| * s_i (s: column norms of W diag(g) Q for k_proj / qkv_proj / gate_proj /
    gate_up_proj under WINA, ones otherwise) and reads ((x~ * m) Q^T) * g."""
    hooks = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = []
        if method == "wina":
            if hasattr(attn, "qkv_proj"):
                config = model.config
                q = config.hidden_size
                kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
                attn_readers, k_weight = [attn.qkv_proj], attn.qkv_proj.weight[q:q + kv]
                scored = {attn.qkv_proj}
            else:
                attn_readers, k_weight = [attn.q_proj, attn.k_proj, attn.v_proj], attn.k_proj.weight
                scored = {attn.k_proj}
            if hasattr(mlp, "gate_up_proj"):
                mlp_readers, gate_weight = [mlp.gate_up_proj], mlp.gate_up_proj.weight[:mlp.gate_up_proj.out_features // 2]
                scored.add(mlp.gate_up_proj)
            else:
                mlp_readers, gate_weight = [mlp.gate_proj, mlp.up_proj], mlp.gate_proj.weight
                scored.add(mlp.gate_proj)
            for readers, g, source in ((attn_readers, layer.input_layernorm.weight, k_weight),
                                       (mlp_readers, layer.post_attention_layernorm.weight, gate_weight)):
                g = g.detach().double()
                rotation = _right_vectors(source.detach().double() * g)
                groups += [(linear, g, rotation, linear in scored) for linear in readers]
        else:
            readers = [m for m in (getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "qkv_proj")) if m]
            readers += [m for m in (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "gate_up_proj")) if m]
            groups += [(linear, None, None, False) for linear in readers]
        groups += [(attn.o_proj, None, None, False), (mlp.down_proj, None, None, False)]
        for linear, g, rotation, scored_by_norms in groups:
            hooks.append(linear.register_forward_pre_hook(
                lambda m, args, g=g, rotation=rotation, scored=scored_by_norms: (_mask(m, args[0], g, rotation, scored),)))
    return hooks


def _mask(linear, x, g, rotation, scored):
    k = keep_count(x.shape[-1], SPARSITY)
    if rotation is None:
        mask = _prefix_mask(reference.topk_mask(x, torch.ones(x.shape[-1]), k))
        return x * mask
    rotated = (x.double() / g) @ rotation
    if scored:
        score = (linear.weight.detach().double() * g @ rotation).norm(dim=0).float()
    else:
        score = torch.ones(x.shape[-1])
    mask = _prefix_mask(reference.topk_mask(rotated.float(), score, k))
    return (((rotated * mask) @ rotation.mT) * g).to(x.dtype)


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("method", ["wina", "teal"])
def test_paper_recipe_matches_an_eager_reimplementation(family, method):
    model, ids = _model(family)
    options = {"method": method, "recipe": "paper", "sparsity": SPARSITY, "inductor": False}
    with torch.no_grad():
        dense = model(ids).logits
        unchanged = torch.compile(model, backend="wina", options={**options, "sparsity": 0.0})(ids).logits
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="wina", options=options)(ids).logits
        report = wina_fx.last_report()
        hooks = _paper_hooks(model, method)
        try:
            expected = model(ids).logits
        finally:
            for h in hooks:
                h.remove()
    torch.testing.assert_close(unchanged, dense, rtol=1e-4, atol=1e-4)  # the transform is lossless
    assert (expected - dense).abs().max() > 1e-2  # the recipe does sparsify
    torch.testing.assert_close(compiled, expected, rtol=1e-3, atol=1e-3)
    scores = {row.name.rsplit(".", 1)[-1]: row.score for row in report.sparse_rows}
    if method == "wina":
        normed = {"qkv_proj", "gate_up_proj"} if family == "phi3" else {"k_proj", "gate_proj"}
        assert {kind for kind, score in scores.items() if score == "column norms"} == normed
    else:
        assert set(scores.values()) <= {"|x| only", "|x| only, the gate's mask"}
        if family == "llama":
            assert scores["up_proj"] == "|x| only, the gate's mask"


def test_paper_recipe_options_and_calibration_agree():
    model, ids = _model("llama")
    model.eval()
    with pytest.raises(wina_fx.WinaOptionError, match="option 'recipe' of method 'cats' must be one of 'default'"):
        wina_fx.WinaConfig(method="cats", recipe="paper")
    with pytest.raises(wina_fx.WinaOptionError, match="brings its own transform"):
        wina_fx.WinaConfig(method="wina", recipe="paper", orthogonalize=True)
    calibration = wina_fx.calibrate(model, [ids], method="wina", recipe="paper", progress=False)
    assert calibration.recipe == "paper"
    with pytest.raises(wina_fx.WinaOptionError, match="measured with recipe='paper'"):
        wina_fx.WinaConfig(method="wina", selection="threshold", calibration=calibration)
    options = {"method": "wina", "recipe": "paper", "sparsity": SPARSITY, "selection": "threshold",
               "calibration": calibration, "inductor": False, "measure": True}
    with torch.no_grad():
        torch.compile(model, backend="wina", options=options)(ids)
    measured = [r.measured_sparsity for r in wina_fx.last_report().sparse_rows]
    assert all(0.3 < m < 0.7 for m in measured), measured


def test_eval_grid_takes_recipes_where_methods_have_them():
    from wina_fx.cli import grid

    configs = grid(["dense", "wina", "teal", "cats"], [0.5], orthogonalize=[False, "full"], recipes=["default", "paper"])
    labels = [c.label for c in configs]
    assert labels == ["dense", "wina uniform 50%", "wina+orth uniform 50%", "wina+paper uniform 50%",
                      "teal uniform 50%", "teal+orth uniform 50%", "teal+paper uniform 50%",
                      "teal+orth+paper uniform 50%", "cats uniform 50%", "cats+orth uniform 50%"]
    assert len({c.key() for c in configs}) == len(configs)
    assert configs[3].options()["recipe"] == "paper"


def test_search_recipes_of_the_accuracy_grid_compile_and_keep_sparsity_zero_exact():
    """benchmarks/accuracy.py --search registers WINA recipes beyond both papers' (issue 13,
    part 4): each is selectable, sparsifies at 50 % and reproduces the dense model at 0 %."""
    import importlib.util
    import os

    from wina_fx.methods import Wina, get_method, register_method

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accuracy.py")
    spec = importlib.util.spec_from_file_location("accuracy_grid", path)
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    model, ids = _model("llama")
    model.eval()
    try:
        variants = grid.register_search_recipes()
        assert {recipe for _, _, recipe in variants} == set(grid.search_recipes()) <= set(get_method("wina").recipes)
        with torch.no_grad():
            dense = model(ids).logits
            for _, _, recipe in variants:
                for sparsity in (0.0, SPARSITY):
                    torch._dynamo.reset()
                    out = torch.compile(model, backend="wina", options={"sparsity": sparsity, "recipe": recipe,
                                                                        "inductor": False})(ids).logits
                    if sparsity == 0:
                        torch.testing.assert_close(out, dense, rtol=1e-4, atol=1e-4)
                    else:
                        assert (out - dense).abs().max() > 1e-3, recipe
                        assert any(r.status == "sparse" for r in wina_fx.last_report().rows), recipe
    finally:
        register_method(Wina(), replace=True)
    assert "prefix" not in get_method("wina").recipes


def test_score_power_spans_teal_to_wina():
    """Recipe.score_power: 0 ranks by |x| alone (TEAL's masks, so TEAL's output), 1 is WINA,
    0.5 lies elsewhere (the tiny model's column norms differ enough to change some masks)."""
    from wina_fx.methods import Wina, register_method
    from wina_fx.methods.base import Recipe

    model, ids = _model("llama")
    model.eval()

    class WinaPowers(Wina):
        recipes = {**Wina.recipes, **{f"p{p:g}": Recipe(f"p{p:g}", score_power=p) for p in (0.0, 0.5, 1.0)}}

    register_method(WinaPowers(), replace=True)
    try:
        outs, labels = {}, {}
        with torch.no_grad():
            for method, recipe in (("teal", "default"), ("wina", "default"), ("wina", "p0"), ("wina", "p0.5"),
                                   ("wina", "p1")):
                torch._dynamo.reset()
                options = {"method": method, "recipe": recipe, "sparsity": SPARSITY, "inductor": False}
                outs[method, recipe] = torch.compile(model, backend="wina", options=options)(ids).logits
                labels[method, recipe] = {row.score for row in wina_fx.last_report().rows if row.score}
        assert torch.equal(outs["wina", "p0"], outs["teal", "default"])
        assert torch.equal(outs["wina", "p1"], outs["wina", "default"])
        assert not torch.equal(outs["wina", "p0.5"], outs["wina", "default"])
        assert not torch.equal(outs["wina", "p0.5"], outs["teal", "default"])
        assert labels["wina", "p0.5"] == {"column norms ^ 0.5"}, labels
    finally:
        register_method(Wina(), replace=True)
