"""The real pretrained SmolLM2-135M-Instruct on real English text (shipped in wina_fx/data)."""
import math

import pytest
import torch

import wina_fx
from wina_fx.data import text
from wina_fx.eval import perplexity, token_windows
from tiny_models import compiled_decode_steps

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def evaluation_windows(smollm2):
    _, tokenizer = smollm2
    return token_windows(tokenizer, text("evaluation"), 256, 2)


@pytest.fixture(scope="module")
def dense_perplexity(smollm2, evaluation_windows):
    return perplexity(smollm2[0], evaluation_windows)


def _parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_sparsity_zero_reproduces_eager(smollm2, evaluation_windows):
    model, _ = smollm2
    ids = evaluation_windows[0][:, :64]
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        out = torch.compile(model, backend="wina", options={"sparsity": 0.0})(ids, use_cache=False).logits
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    assert len(wina_fx.last_report().sparse_rows) == 30 * len(KINDS)


def test_half_sparsity_topk_rewrites_every_projection_and_meets_its_target(smollm2, evaluation_windows, dense_perplexity):
    model, _ = smollm2
    before = _parameters(model)
    compiled = torch.compile(model, backend="wina", options={"sparsity": 0.5, "measure": True})
    ppl = perplexity(compiled, evaluation_windows)
    report = wina_fx.last_report()
    expected = {f"model.layers.{i}.{part}.{kind}" for i in range(30) for kind in KINDS
                for part in ("self_attn", "mlp") if (part == "mlp") == (kind in ("gate_proj", "up_proj", "down_proj"))}
    assert {row.name for row in report.sparse_rows} == expected
    assert report.row("lm_head").status.startswith("dense")
    for row in report.sparse_rows:
        assert abs(row.measured_sparsity - 0.5) <= 0.01, row
    print(f"\nSmolLM2 perplexity: dense {dense_perplexity:.2f}, wina 50% top-k {ppl:.2f}")
    assert math.isfinite(ppl) and ppl > dense_perplexity
    after = _parameters(model)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_threshold_calibrated_on_one_text_meets_target_on_another(smollm2, evaluation_windows):
    model, tokenizer = smollm2
    calibration_windows = token_windows(tokenizer, text("calibration"), 256, 4)
    calibration = wina_fx.calibrate(model, calibration_windows, method="wina", progress=False)
    options = {"selection": "threshold", "calibration": calibration, "sparsity": 0.5, "measure": True, "inductor": False}
    ppl = perplexity(torch.compile(model, backend="wina", options=options), evaluation_windows)
    report = wina_fx.last_report()
    assert len(report.sparse_rows) == 30 * len(KINDS)
    measured = [row.measured_sparsity for row in report.sparse_rows]
    mean = sum(measured) / len(measured)
    print(f"\nthreshold 50%: mean measured {mean:.3f}, range {min(measured):.3f}..{max(measured):.3f}, ppl {ppl:.2f}")
    assert abs(mean - 0.5) < 0.03
    assert math.isfinite(ppl)


def test_harness_scores_the_shipped_tasks_as_the_builtin_scorer_does(smollm2):
    """lm-evaluation-harness, reading the shipped JSONL through a generated task YAML, gives
    the built-in scorer's acc and acc_norm on the first items of a task, dense and through
    the sparse backend, plus standard errors."""
    from wina_fx.harness import harness_accuracy
    from wina_fx.tasks import load_task, multiple_choice_accuracy

    model, tokenizer = smollm2
    items = load_task("quiz_facts")[:8]
    torch._dynamo.reset()
    # dynamic: one graph for the batches' lengths (else one compilation per length)
    sparse = torch.compile(model, backend="wina", options={"sparsity": 0.5, "inductor": False}, dynamic=True)
    for scored in (model, sparse):
        got = harness_accuracy(scored, tokenizer, ["quiz_facts"], limit=8, batch_size=8)["quiz_facts"]
        mine = multiple_choice_accuracy(scored, tokenizer, items, 8)
        assert got["n"] == 8 and 0 < got["acc_stderr"] < 0.25
        assert (got["acc"], got["acc_norm"]) == (mine["acc"], mine["acc_norm"])
        assert len(got["items"]) == 8 and set(got["items"]) <= {0, 1} and sum(got["items"]) / 8 == got["acc"]
    assert wina_fx.last_report().sparse_rows  # the sparse model was the one scored
    torch._dynamo.reset()


@torch.no_grad()
def test_decode_with_sdpa_grouped_query_attention(smollm2, evaluation_windows):
    """SmolLM2 (9 query heads over 3 K/V heads) decoding with a static cache at 50 %: option
    sdpa_gqa rewrites all 30 one-token attentions to read K/V as stored, and gives the
    logits the traced attention over repeated K/V gives, step after step."""
    model, _ = smollm2
    prompt = evaluation_windows[0][:, :24]
    logits, notes = {}, {}
    for rewrite in (True, False):
        options = {"sparsity": 0.5, "inductor": False, "sdpa_gqa": rewrite}
        logits[rewrite], notes[rewrite] = compiled_decode_steps(model, prompt, options, cache_len=32)
    assert any(n.startswith("attention: 30 one-token attentions") for n in notes[True]), notes[True]
    assert not any(n.startswith("attention:") for n in notes[False])
    assert ((logits[True] - logits[False]).norm() / logits[False].norm()).item() < 1e-5
