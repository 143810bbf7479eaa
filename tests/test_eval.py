"""wina_fx.eval and the wina-fx eval CLI: records against direct computations, on a tiny model."""
import math

import pytest
import torch
from test_tasks import WordTokenizer, direct_logliks
from tiny_models import tiny_model

from wina_fx import cli
from wina_fx.data import text
from wina_fx.eval import (EvalConfig, EvalData, comparisons, evaluate, markdown_table, measured_sparsity, perplexity,
                          token_windows)
from wina_fx.report import Report, ReportRow
from wina_fx.tasks import Item, load_task, select_items


class Tokenizer(WordTokenizer):
    """The word tokenizer of test_tasks, also answering ``return_tensors="pt"`` like transformers."""

    class _Encoding(dict):
        input_ids = None

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = super().__call__(text)["input_ids"]
        out = self._Encoding(input_ids=ids)
        out.input_ids = torch.tensor([ids]) if return_tensors == "pt" else ids
        return out


@pytest.fixture(scope="module")
def tiny():
    model, _ = tiny_model("llama", vocab=96)
    return model, Tokenizer()


def direct_perplexity(model, ids, window):
    """exp of the mean of -log p(token | the tokens before it in its window), in float64."""
    nll, count = 0.0, 0
    for start in range(0, (ids.numel() // window) * window, window):
        chunk = ids[start : start + window]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(chunk[None]).logits[0].double(), dim=-1)
        for t in range(1, window):
            nll -= logprobs[t - 1, chunk[t]].item()
            count += 1
    return math.exp(nll / count)


def test_perplexity_of_an_evaluation_equals_a_direct_computation(tiny):
    model, tokenizer = tiny
    snippet = text("evaluation")[:3000]  # real text, about 600 toy tokens
    data = EvalData(token_windows(tokenizer, snippet, 48, 6), {})
    ids = tokenizer(snippet, return_tensors="pt").input_ids[0]
    assert ids.numel() > 7 * 48  # the windows stop at 6, before the text does
    want = direct_perplexity(model, ids[: 6 * 48], 48)
    record = evaluate(model, tokenizer, EvalConfig("dense"), data)
    assert record["ppl"] == pytest.approx(want, rel=1e-5)
    assert perplexity(model, data.windows) == pytest.approx(want, rel=1e-5)
    assert record["measured_sparsity"] == 0.0 and record["tasks"] == {}
    assert (record["method"], record["orthogonalize"], record["allocation"], record["sparsity"]) == ("dense", False, "uniform", 0.0)


def test_task_scores_of_an_evaluation_equal_a_direct_log_likelihood(tiny):
    model, tokenizer = tiny
    items = select_items(load_task("quiz_facts"), 3, seed=1) + [Item("1 + 1 =", (" 2", " 3", " eleven"), 0)]
    scores = direct_logliks(model, tokenizer, items)
    acc = sum(max(range(len(s)), key=s.__getitem__) == it.label for s, it in zip(scores, items)) / len(items)
    acc_norm = sum(max(range(len(s)), key=lambda k: s[k] / len(it.choices[k])) == it.label
                   for s, it in zip(scores, items)) / len(items)
    record = evaluate(model, tokenizer, EvalConfig("dense"), EvalData([], {"mine": items}), batch_size=4)
    assert record["tasks"]["mine"] == {"acc": acc, "acc_norm": acc_norm, "n": 4}
    assert record["acc_mean"] == acc and record["acc_norm_mean"] == acc_norm
    assert "ppl" not in record


def test_sparse_evaluation_measures_its_sparsity_over_every_compiled_shape(tiny):
    model, tokenizer = tiny
    data = EvalData(token_windows(tokenizer, text("evaluation")[:2000], 32, 2),
                    {"quiz_facts": select_items(load_task("quiz_facts"), 3)})
    dense = evaluate(model, tokenizer, EvalConfig("dense"), data, batch_size=4)
    sparse = evaluate(model, tokenizer, EvalConfig("wina", 0.5), data, batch_size=4)
    # every q/k/v/o/gate/up/down input has an even width: top-k keeps exactly half
    assert sparse["measured_sparsity"] == pytest.approx(0.5) and sparse["target_sparsity"] == pytest.approx(0.5)
    assert sparse["sparse_linears"] == sparse["linears"] == 2 * 7
    assert dense["linears"] == 2 * 7 and dense["measured_sparsity"] == 0.0  # the head is not counted
    assert sparse["ppl"] != dense["ppl"] and sparse["tasks"]["quiz_facts"]["n"] == 3
    for record in (dense, sparse):  # every sample the statistics need is kept
        assert len(record["window_nll"]) == len(record["window_tokens"]) == 2
        assert record["ppl"] == pytest.approx(math.exp(sum(record["window_nll"]) / sum(record["window_tokens"])))
        assert record["ppl_ci"][0] <= record["ppl"] <= record["ppl_ci"][1]
    sparse_too = dict(sparse, method="teal")  # a second sparse configuration on the same windows
    (pair,) = comparisons([dense, sparse, sparse_too])
    assert pair["a"] == "wina" and pair["b"] == "teal" and pair["log_ppl_difference"] == 0.0


def _report(rows):
    return Report(rows, "wina", "topk")


def test_measured_sparsity_weighs_by_size_sums_shapes_and_leaves_out_the_head():
    def row(name, k, n, status="sparse", kept=None, seen=None, target=0.5):
        counts = None if kept is None else torch.tensor([kept, seen], dtype=torch.float64)
        return ReportRow(name, status, target if status == "sparse" else None, k, n, counts)

    first = _report([row("a", 10, 10, kept=30, seen=100), row("b", 10, 30, "dense: cats computes it dense"),
                     row("lm_head", 10, 1000, "dense: output head (logits projection)")])
    second = _report([row("a", 10, 10, kept=70, seen=100), row("b", 10, 30, "dense: cats computes it dense")])
    got = measured_sparsity([first, second])
    # a: 1 - 100/200 = 0.5 on 100 weights; b: dense, 0 on 300 weights; the head is not counted
    assert got["measured_sparsity"] == pytest.approx(0.5 * 100 / 400)
    assert got["target_sparsity"] == pytest.approx(0.5 * 100 / 400)
    assert (got["sparse_linears"], got["linears"]) == (1, 2)


def test_item_subsets_are_seeded_and_nested():
    items = load_task("wordnet_example")
    ten, twenty = select_items(items, 10, seed=3), select_items(items, 20, seed=3)
    assert ten == twenty[:10] == select_items(items, 10, seed=3)
    assert ten != select_items(items, 10, seed=4) and ten != items[:10]
    assert len(select_items(items, 10_000)) == len(items)
    with pytest.raises(ValueError, match="positive int"):
        select_items(items, 0)


def test_configurations_are_checked_before_any_model_runs():
    with pytest.raises(ValueError, match="'wina', 'teal'"):
        EvalConfig("wona", 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        EvalConfig("wina", 1.5)
    assert EvalConfig("wina", 0.5, orthogonalize=True).orthogonalize == "full"
    assert not EvalConfig("wina", 0.5).needs_calibration
    assert EvalConfig("wina", 0.5, selection="threshold").needs_calibration
    assert EvalConfig("teal", 0.4, allocation="greedy").needs_calibration
    with pytest.raises(ValueError, match="needs a calibration"):
        evaluate(None, None, EvalConfig("wina", 0.5, selection="threshold"), EvalData([], {}))


def test_grid_has_dense_once_and_every_combination():
    configs = cli.grid(["dense", "wina", "teal"], [0.0, 0.25, 0.5], "topk", ["uniform", "greedy"], [False, "full"])
    assert [c.method for c in configs].count("dense") == 1
    assert len(configs) == 1 + 2 * 2 * 2 * 2  # methods x orthogonalize x allocation x (sparsities > 0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--methods", "wina,wona"], "invalid choice 'wona'.*'wina', 'teal'"),
        (["eval", "--sparsities", "0.5,1.2"], r"\[0, 1\), got 1.2"),
        (["eval", "--sparsities", "half"], "comma-separated numbers"),
        (["eval", "--tasks", "hellaswag"], "invalid choice 'hellaswag'.*'wordnet_gloss'"),
        (["eval", "--tasks", "all", "--limit", "0"], "positive integer"),
        (["eval", "--limit", "10"], "--limit: needs --tasks"),
        (["eval", "--windows", "0"], "nothing to evaluate"),
        (["eval", "--orthogonalize", "maybe"], "invalid choice 'maybe'.*'false', 'no', 'true'"),
        (["eval", "--allocation", "smart"], "invalid choice 'smart'.*'uniform', 'greedy'"),
        (["eval", "--selection", "random"], "invalid choice: 'random'"),
        (["eval", "--model", "gpt5"], "invalid choice: 'gpt5'"),
        (["generate", "--method", "wona", "hi"], "invalid choice: 'wona' \\(choose from 'wina', 'teal', 'cats'\\)"),
        (["generate", "--sparsity", "1.5", "hi"], r"\[0, 1\), got 1.5"),
        (["generate", "--prefill", "half", "hi"], "invalid choice: 'half' \\(choose from 'sparse', 'dense'\\)"),
        (["generate", "--new-tokens", "0", "hi"], "positive integer"),
        (["generate"], "the following arguments are required: prompt"),
    ],
)
def test_cli_argument_errors_are_clear(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert __import__("re").search(message, err), err


def test_generate_parses():
    args = cli.parse_args(["generate", "--method", "teal", "--sparsity", "0.4", "--prefill", "dense", "Hello?"])
    assert (args.prompt, args.method, args.sparsity, args.prefill, args.inductor) == ("Hello?", "teal", 0.4, "dense", True)


def test_cli_parses_a_full_grid():
    args = cli.parse_args(["eval", "--methods", "dense,wina,cats", "--sparsities", "0.25,0.5", "--allocation",
                           "uniform,greedy", "--orthogonalize", "false,true", "--tasks", "all", "--limit", "50"])
    assert args.methods == ["dense", "wina", "cats"] and args.sparsities == [0.25, 0.5]
    assert args.orthogonalize == [False, "full"] and args.allocation == ["uniform", "greedy"]
    assert len(args.tasks) == 4 and args.limit == 50 and args.inductor is False


def test_markdown_table():
    def rec(method, sparsity, ppl, orth=False, allocation="uniform"):
        return {"method": method, "orthogonalize": orth, "allocation": allocation, "sparsity": sparsity, "ppl": ppl,
                "tasks": {"t": {"acc": ppl / 100, "acc_norm": 0.0, "n": 1}}}

    records = [rec("dense", 0.0, 10.0), rec("wina", 0.5, 12.0), rec("wina", 0.5, 11.0, "full"),
               rec("teal", 0.5, 13.0, allocation="greedy"), rec("wina", 0.25, 10.5)]
    assert markdown_table(records, "ppl") == "\n".join([
        "| sparsity | wina | wina+orth | teal (greedy) |",
        "|---|---|---|---|",
        "| 0% (dense) | 10.00 | 10.00 | 10.00 |",
        "| 25% | 10.50 | - | - |",
        "| 50% | 12.00 | 11.00 | 13.00 |",
    ])
    assert "| 50% | 0.120 | 0.110 | 0.130 |" in markdown_table(records, "acc_t")


def test_accuracy_comparisons_pair_configurations_on_the_same_items():
    """Records scored by the harness (per-item acc) are compared pairwise at equal sparsity
    over all their items; dense records, other sparsities and records without items are not."""
    from wina_fx.eval import accuracy_comparison_table, accuracy_comparisons

    def record(method, sparsity, first, second=None):
        tasks = {"a": {"acc": sum(first) / len(first), "items": first}}
        if second is not None:
            tasks["b"] = {"acc": sum(second) / len(second), "items": second}
        return {"method": method, "orthogonalize": False, "allocation": "uniform", "selection": "topk",
                "sparsity": sparsity, "recipe": "default", "tasks": tasks}

    ones, zeros = [1] * 60 + [0] * 40, [1] * 30 + [0] * 70
    records = [record("dense", 0.0, ones, ones), record("wina", 0.5, ones, ones), record("teal", 0.5, zeros, ones),
               record("rsparse", 0.65, ones, ones),
               {**record("cats", 0.5, ones), "tasks": {"a": {"acc": 0.6}, "b": {"acc": 0.6}}}]
    (found,) = accuracy_comparisons(records)
    assert (found["a"], found["b"], found["items"]) == ("wina", "teal", 200)
    assert found["acc_difference"] == pytest.approx(0.15) and found["significant"]
    assert "| 50% | wina | teal | 200 | +0.1500 |" in accuracy_comparison_table(records)


def test_verdict_table_says_who_is_ahead_under_each_recipe():
    """WINA against TEAL with the same recipe and allocation, and against R-Sparse and CATS
    (default recipe, uniform): the cell names the side ahead only when the paired interval
    excludes 0; a missing rival is '-'."""
    from wina_fx.eval import verdict_table

    gen = torch.Generator().manual_seed(0)
    base = (3.0 + 0.3 * torch.rand(64, generator=gen)).tolist()

    def record(method, recipe, allocation, shift):
        return {"method": method, "orthogonalize": False, "allocation": allocation, "selection": "topk",
                "sparsity": 0.5, "recipe": recipe, "window_nll": [(v + shift) * 512 for v in base],
                "window_tokens": [512] * 64}

    records = [record("wina", "default", "uniform", 0.0), record("teal", "default", "uniform", 0.05),
               record("rsparse", "default", "uniform", 0.0), record("cats", "default", "uniform", -0.05),
               record("wina", "paper", "greedy", 0.0), record("teal", "paper", "greedy", 0.0)]
    lines = verdict_table(records).splitlines()
    assert lines[2] == ("| 50% | default, uniform | -0.050 [-0.050, -0.050] WINA | +0.000 [+0.000, +0.000] level "
                        "| +0.050 [+0.050, +0.050] CATS |")
    assert lines[3].startswith("| 50% | paper, greedy | +0.000 [+0.000, +0.000] level |")
    assert len(lines) == 4  # no paper-uniform or default-greedy WINA: no row


def test_two_runs_sharing_a_results_file_keep_each_others_records(tmp_path):
    """benchmarks/accuracy.py: a run saving its results takes in what another run wrote to the
    same file meanwhile (resumable background runs over different configurations), and
    --merge-from refuses records measured on other data."""
    import importlib.util
    import json
    import os

    import pytest

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "accuracy.py")
    spec = importlib.util.spec_from_file_location("accuracy_grid_save", path)
    grid = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grid)
    header = {k: 1 for k in grid.SAME_DATA}

    def record(method, sparsity):
        return {"method": method, "orthogonalize": False, "allocation": "uniform", "sparsity": sparsity}

    out = str(tmp_path / "accuracy_x.json")
    first = {"header": dict(header), "records": [record("wina", 0.5)], "skipped": []}
    second = {"header": dict(header), "records": [record("teal", 0.5)], "skipped": []}
    grid.save(out, first)
    grid.save(out, second)  # loaded before the first run wrote: must not drop wina
    first["records"].append(record("wina", 0.65))
    grid.save(out, first)
    on_disk = json.loads(open(out).read())
    assert sorted((r["method"], r["sparsity"]) for r in on_disk["records"]) == [
        ("teal", 0.5), ("wina", 0.5), ("wina", 0.65)]
    with pytest.raises(ValueError, match="other data"):
        grid.merge(first, {"header": {**header, "seed": 2}, "records": [record("cats", 0.5)]})
