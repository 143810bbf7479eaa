"""Evaluation on real data: perplexity over fixed-length windows of held-out text, and
zero-shot multiple-choice accuracy (``wina_fx.tasks``), for one model under one
``backend="wina"`` configuration::

    from wina_fx.eval import EvalConfig, EvalData, evaluate
    data = EvalData.build(tokenizer, tasks=("wordnet_gloss",), limit=100)
    record = evaluate(model, tokenizer, EvalConfig("wina", 0.5), data)
    record["ppl"], record["measured_sparsity"], record["tasks"]["wordnet_gloss"]["acc"]

Perplexity is read on ``wina_fx/data/evaluation.txt`` and calibrations are measured on
``calibration.txt``: two different novels, so the two never share a sentence.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from .config import needs_calibration
from .options import orthogonalize_variant
from .stats import paired_accuracy_difference, paired_difference, perplexity_interval


def token_windows(tokenizer, text: str, window: int, max_windows: int | None = None) -> list[torch.Tensor]:
    """The text's tokens cut into consecutive, non-overlapping (1, window) id tensors."""
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    count = ids.numel() // window
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window].unsqueeze(0) for i in range(count)]


@torch.no_grad()
def window_losses(model, windows: list[torch.Tensor]) -> tuple[list[float], list[int]]:
    """(summed next-token negative log-likelihood, predicted tokens) of each window.

    ``model(ids)`` must return logits (or an object with ``.logits``) of shape
    (1, T, vocab); each window predicts its tokens 1..T-1 from the ones before.
    """
    nlls, counts = [], []
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    for ids in windows:
        out = model(ids.to(device), use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        nlls.append(float(nll))
        counts.append(targets.numel())
    return nlls, counts


def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over all windows."""
    nlls, counts = window_losses(model, windows)
    return math.exp(sum(nlls) / sum(counts))


@torch.no_grad()
def decode_perplexity(model, windows: list[torch.Tensor], prompt_len: int) -> float:
    """Perplexity of each window's continuation as a server computes it: tokens
    0..prompt_len-1 in one prefill step, then one true token per decode step through the
    KV cache.  (Under option prefill='dense' this is what separates the two settings; a
    whole-window forward would be one prefill step.)  Predicts tokens prompt_len..T-1."""
    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    for ids in windows:
        ids = ids.to(device)
        if not 0 < prompt_len < ids.shape[1]:
            raise ValueError(f"prompt_len must be in [1, {ids.shape[1] - 1}], got {prompt_len}")
        out = model(ids[:, :prompt_len], use_cache=True)
        logits = [out.logits[:, -1]]
        for t in range(prompt_len, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
        logits = torch.stack(logits, dim=1).float()
        targets = ids[:, prompt_len:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)


# ---------------------------------------------------------------- configurations


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One point of a grid: what ``torch.compile(model, backend="wina", options=...)`` gets.

    ``orthogonalize`` is False or a prepass variant (True means "full"); ``allocation`` is
    the option ``sparsity_allocation``. ``inductor=False`` runs the rewritten graph op by
    op: the same numbers without Inductor's compile time (what a CPU grid wants).
    """

    method: str = "dense"
    sparsity: float = 0.0
    selection: str = "topk"
    allocation: str = "uniform"
    orthogonalize: bool | str = False
    inductor: bool = False
    recipe: str = "default"

    def __post_init__(self):
        object.__setattr__(self, "orthogonalize", orthogonalize_variant(self.orthogonalize) or False)
        object.__setattr__(self, "sparsity", float(self.sparsity))
        self.needs_calibration  # the backend's own validation: a bad grid fails before any model runs

    def options(self, calibration=None) -> dict:
        """The ``options`` dict for ``backend="wina"`` (with measure=True)."""
        options = {
            "method": self.method,
            "sparsity": self.sparsity,
            "selection": self.selection,
            "sparsity_allocation": self.allocation,
            "orthogonalize": self.orthogonalize,
            "measure": True,
            "inductor": self.inductor,
            "recipe": self.recipe,
        }
        if calibration is not None:
            options["calibration"] = calibration
        return options

    @property
    def needs_calibration(self) -> bool:
        """Whether the backend refuses this configuration without option ``calibration``
        (threshold selection, greedy allocation, R-Sparse's per-matrix search, ...)."""
        return needs_calibration(self.options())

    @property
    def transforms(self) -> bool:
        """Whether the orthogonalization prepass runs (option orthogonalize, or the recipe's)."""
        from .methods import get_method

        return get_method(self.method).recipes[self.recipe].prepass(self.orthogonalize or None)[0] is not None

    @property
    def label(self) -> str:
        """e.g. "wina+orth greedy 50%" or "dense"."""
        if self.method == "dense":
            return "dense"
        name = self.method + ("+orth" if self.orthogonalize == "full" else f"+orth-{self.orthogonalize}" if self.orthogonalize else "")
        name += f"+{self.recipe}" if self.recipe != "default" else ""
        extra = "" if self.selection == "topk" else f" {self.selection}"
        return f"{name} {self.allocation}{extra} {self.sparsity:.0%}"

    def key(self) -> tuple:
        """What identifies this configuration's record (for resuming a grid)."""
        return (self.method, self.orthogonalize, self.allocation, self.selection, round(self.sparsity, 6), self.recipe)


def record_key(record: dict) -> tuple:
    """``EvalConfig.key()`` of a record written by :func:`evaluate`."""
    return (record["method"], record["orthogonalize"], record["allocation"], record.get("selection", "topk"),
            round(record["sparsity"], 6), record.get("recipe", "default"))


# ---------------------------------------------------------------- data


@dataclasses.dataclass
class EvalData:
    """The held-out inputs of an evaluation: perplexity windows and multiple-choice items."""

    windows: list[torch.Tensor]
    tasks: dict  # task name -> list[wina_fx.tasks.Item]
    scorer: str = "builtin"  # or "harness": lm-evaluation-harness scores the tasks (wina_fx.harness)

    @classmethod
    def build(cls, tokenizer, tasks: Sequence[str] = (), limit: int | None = None, windows: int = 8,
              window_len: int = 512, seed: int = 0, scorer: str = "builtin") -> "EvalData":
        """``windows`` x ``window_len`` tokens of the evaluation text, and for each task its
        first ``limit`` items (all when limit is None): after a shuffle with ``seed`` for the
        built-in scorer, in file order for lm-evaluation-harness (its ``limit``)."""
        from .data import text
        from .tasks import load_task, select_items

        if scorer not in ("builtin", "harness"):
            raise ValueError(f"scorer must be 'builtin' or 'harness', got {scorer!r}")
        pick = (lambda items: items[:limit]) if scorer == "harness" else (lambda items: select_items(items, limit, seed))
        return cls(
            token_windows(tokenizer, text("evaluation"), window_len, windows) if windows else [],
            {name: pick(load_task(name)) for name in tasks},
            scorer,
        )

    def describe(self) -> dict:
        return {
            "ppl_text": "wina_fx/data/evaluation.txt",
            "ppl_windows": len(self.windows),
            "ppl_window_len": int(self.windows[0].shape[1]) if self.windows else 0,
            "ppl_tokens": sum(int(w.numel()) for w in self.windows),
            "task_items": {name: len(items) for name, items in self.tasks.items()},
            "task_scorer": self.scorer,
        }


def calibration_windows(tokenizer, windows: int = 8, window_len: int = 512) -> list[torch.Tensor]:
    """Calibration inputs: windows of ``wina_fx/data/calibration.txt`` (disjoint from the evaluation text)."""
    from .data import text

    return token_windows(tokenizer, text("calibration"), window_len, windows)


def calibrate_for(model, inputs: list[torch.Tensor], config: EvalConfig, allocation_targets: Sequence[float] = ()):
    """The calibration ``config`` needs: ``wina_fx.calibrate`` for its method and prepass,
    with greedy allocations for ``allocation_targets`` (default: its own sparsity) when
    its allocation is greedy. One calibration serves every sparsity of that kind."""
    from .calibration import calibrate

    kwargs = {}
    if config.allocation == "greedy":
        kwargs["allocation_targets"] = sorted(set(allocation_targets) | {config.sparsity})
    return calibrate(model, inputs, method=config.method, orthogonalize=config.orthogonalize, recipe=config.recipe,
                     progress=False, **kwargs)


def calibration_kind(config: EvalConfig) -> tuple:
    """Configurations of one kind can share one calibration (see :func:`calibrate_for`)."""
    return (config.method, config.orthogonalize, config.allocation == "greedy", config.recipe)


# ---------------------------------------------------------------- one evaluation


def evaluate(model, tokenizer, config: EvalConfig, data: EvalData, calibration=None, batch_size: int = 16,
             pad_multiple: int = 16) -> dict:
    """Compile ``model`` with ``backend="wina"`` under ``config`` and evaluate it on ``data``.

    Returns a record: the configuration (``method``, ``orthogonalize``, ``allocation``,
    ``selection``, ``sparsity``), ``measured_sparsity`` (over every linear but the output
    head, each weighted by its weight's size, a linear left dense counting 0; counted on
    every token this evaluation ran), ``target_sparsity`` (the same average of the
    targets), ``ppl``, ``tasks`` ({name: {"acc", "acc_norm", "n"}}), ``acc_mean`` and
    ``acc_norm_mean`` (unweighted means over tasks), the report's notes and timings.
    """
    from .report import reports

    if config.needs_calibration and calibration is None:
        raise ValueError(f"{config.label}: this configuration needs a calibration (wina_fx.calibrate)")
    torch._dynamo.reset()
    seen = {id(r) for r in reports()}
    with _shapes(static=config.transforms):
        return _evaluate(model, tokenizer, config, data, calibration, batch_size, pad_multiple, seen)


@contextlib.contextmanager
def _shapes(static: bool):
    """How dynamo meets the evaluation's input shapes (one for the perplexity windows and a
    few for the task batches). Symbolic shapes from the start (one or two compilations),
    except for the orthogonalization prepass, which leaves a graph with symbolic shapes
    unchanged (and says so): then one static compilation per shape, with a recompile limit
    high enough that no shape falls back to running uncompiled (dense)."""
    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(automatic_dynamic_shapes=not static, recompile_limit=64, accumulated_recompile_limit=1024):
        yield


def _evaluate(model, tokenizer, config, data, calibration, batch_size, pad_multiple, seen) -> dict:
    from .report import reports
    from .tasks import multiple_choice_accuracy

    compiled = torch.compile(model, backend="wina", options=config.options(calibration),
                             dynamic=None if config.transforms else True)
    record = {
        "method": config.method,
        "orthogonalize": config.orthogonalize,
        "allocation": config.allocation,
        "selection": config.selection,
        "sparsity": config.sparsity,
        "recipe": config.recipe,
    }
    started = time.time()
    if data.windows:
        record["window_nll"], record["window_tokens"] = window_losses(compiled, data.windows)
        record["ppl"] = math.exp(sum(record["window_nll"]) / sum(record["window_tokens"]))
        record["ppl_ci"] = list(perplexity_interval(record["window_nll"], record["window_tokens"]))
    record["ppl_s"] = round(time.time() - started, 1)
    results = {}
    if data.scorer == "harness" and data.tasks:
        from .harness import harness_accuracy

        results = harness_accuracy(compiled, tokenizer, list(data.tasks), max(map(len, data.tasks.values())), batch_size)
    for name, items in data.tasks.items() if data.scorer == "builtin" else ():
        results[name] = multiple_choice_accuracy(compiled, tokenizer, items, batch_size, pad_multiple)
    record["tasks"] = results
    if results:
        record["acc_mean"] = sum(r["acc"] for r in results.values()) / len(results)
        record["acc_norm_mean"] = sum(r["acc_norm"] for r in results.values()) / len(results)
    record["tasks_s"] = round(time.time() - started - record["ppl_s"], 1)
    mine = [r for r in reports() if id(r) not in seen]
    record.update(measured_sparsity(mine, _output_head_names(model)))
    record["notes"] = sorted({note for r in mine for note in r.notes})
    record["compilations"] = len(mine)
    if config.transforms:  # how many compiled graphs the prepass really transformed
        record["orthogonalized_graphs"] = sum(bool(r.orthogonalize and r.orthogonalize.applied) for r in mine)
    torch._dynamo.reset()
    return record


def _output_head_names(model) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if module is head} if head is not None else set()


def measured_sparsity(reports_: list, leave_out: set[str] = frozenset()) -> dict:
    """Size-weighted target and measured sparsity over the reports of one evaluation.

    Each linear's (kept, seen) counts are summed over every report that holds it (a model
    compiled for several input shapes makes one report each). The output head is left
    out (so are the linears named in ``leave_out``: under method "dense" the report does
    not single the head out); any other linear left dense counts as sparsity 0 with its
    full size.
    """
    sizes, targets, kept, seen = {}, {}, {}, {}
    for report in reports_:
        for row in report.rows:
            if row.in_features is None or row.name in leave_out or row.status.startswith("dense: output head"):
                continue
            sizes[row.name] = row.in_features * row.out_features
            targets[row.name] = row.target_sparsity or 0.0
            if row.status == "sparse" and row.counts is not None:
                k, s = row.counts.tolist()
                kept[row.name] = kept.get(row.name, 0.0) + k
                seen[row.name] = seen.get(row.name, 0.0) + s
    total = sum(sizes.values())
    if not total:
        return {"measured_sparsity": None, "target_sparsity": None, "sparse_linears": 0, "linears": 0}
    measured = sum(size * (1.0 - kept[n] / seen[n]) for n, size in sizes.items() if seen.get(n))
    return {
        "measured_sparsity": measured / total,
        "target_sparsity": sum(size * targets[n] for n, size in sizes.items()) / total,
        "sparse_linears": sum(1 for n in sizes if seen.get(n)),
        "linears": len(sizes),
    }


# ---------------------------------------------------------------- tables

METRICS = {
    "ppl": ("perplexity", "{:.2f}"),
    "acc_mean": ("mean acc", "{:.3f}"),
    "acc_norm_mean": ("mean acc_norm", "{:.3f}"),
    "measured_sparsity": ("measured sparsity", "{:.3f}"),
}


def variant(record: dict) -> str:
    """A record's column in a table: method, prepass, allocation and selection, no sparsity."""
    if record["method"] == "dense":
        return "dense"
    orth = record["orthogonalize"]
    name = record["method"] + ("" if not orth else "+orth" if orth == "full" else f"+orth-{orth}")
    if record.get("recipe", "default") != "default":
        name += f"+{record['recipe']}"
    if record["allocation"] != "uniform":
        name += f" ({record['allocation']})"
    if record.get("selection", "topk") != "topk":
        name += f" [{record['selection']}]"
    return name


def markdown_table(records: list[dict], metric: str = "ppl") -> str:
    """Rows: dense, then each sparsity; columns: each method variant in record order."""
    if metric.startswith("acc_") and metric not in METRICS:  # a task: "acc_<task>" / "acc_norm_<task>"
        fmt = "{:.3f}"
    else:
        fmt = METRICS[metric][1]

    def value(record):
        if metric in record:
            return record[metric]
        for key in ("acc_norm", "acc"):
            prefix = f"{key}_"
            if metric.startswith(prefix) and metric[len(prefix):] in record.get("tasks", {}):
                return record["tasks"][metric[len(prefix):]][key]
        return None

    def cell(record):
        v = None if record is None else value(record)
        if v is None:
            return "-"
        if metric == "ppl" and record.get("ppl_ci"):
            low, high = record["ppl_ci"]
            return f"{fmt.format(v)} [{fmt.format(low)}, {fmt.format(high)}]"
        return fmt.format(v)

    sparse = [r for r in records if r["method"] != "dense"]
    columns = list(dict.fromkeys(variant(r) for r in sparse)) or ["dense"]
    dense = next((r for r in records if r["method"] == "dense"), None)
    lines = ["| sparsity | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    if dense is not None:
        lines.append("| 0% (dense) | " + " | ".join(cell(dense) for _ in columns) + " |")
    for s in sorted({r["sparsity"] for r in sparse}):
        row = [cell(next((r for r in sparse if variant(r) == c and r["sparsity"] == s), None)) for c in columns]
        lines.append(f"| {s:.0%} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _pairs(records: list[dict], scored_on):
    """(a, b) for every pair of sparse configurations at the same sparsity scored on the same
    data: ``scored_on(record)`` says on what (None: not scored)."""
    scored = [(r, scored_on(r)) for r in records if r["method"] != "dense"]
    scored = [(r, on) for r, on in scored if on is not None]
    for i, (a, on_a) in enumerate(scored):
        for b, on_b in scored[i + 1:]:
            if a["sparsity"] == b["sparsity"] and on_a == on_b:
                yield a, b


def comparisons(records: list[dict]) -> list[dict]:
    """Every pair of sparse configurations at the same sparsity scored on the same windows:
    the paired bootstrap of their log-perplexity difference (``wina_fx.stats``)."""
    return [{"a": variant(a), "b": variant(b), "sparsity": a["sparsity"],
             **paired_difference(a["window_nll"], b["window_nll"], a["window_tokens"])}
            for a, b in _pairs(records, lambda r: r["window_tokens"] if r.get("window_nll") else None)]


def _task_items(record: dict) -> dict | None:
    """{task: each item's acc} of a record scored by the harness, tasks in name order; None
    when it holds no per-item results."""
    tasks = record.get("tasks") or {}
    if not tasks or not all("items" in t for t in tasks.values()):
        return None
    return {name: t["items"] for name, t in sorted(tasks.items())}


def accuracy_comparisons(records: list[dict]) -> list[dict]:
    """Every pair of sparse configurations at the same sparsity scored on the same task items
    (harness scorer): the paired bootstrap of their accuracy difference over all items."""
    def item_counts(record):
        items = _task_items(record)
        return None if items is None else {name: len(v) for name, v in items.items()}

    found = []
    for a, b in _pairs(records, item_counts):
        joined_a, joined_b = ([x for v in _task_items(r).values() for x in v] for r in (a, b))
        found.append({"a": variant(a), "b": variant(b), "sparsity": a["sparsity"], "items": len(joined_a),
                      **paired_accuracy_difference(joined_a, joined_b)})
    return found


def _interval_cells(c: dict) -> str:
    """The last cells of a comparison row: the 95 % interval and whether it excludes 0."""
    return f"[{c['ci'][0]:+.4f}, {c['ci'][1]:+.4f}] | {'yes' if c['significant'] else 'no'} |"


def accuracy_comparison_table(records: list[dict]) -> str:
    """Markdown: for each pair at one sparsity, acc(a) - acc(b) over all items with its 95 % interval."""
    lines = ["| sparsity | a | b | items | acc(a) - acc(b) | 95% interval | significant |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {c['sparsity']:.0%} | {c['a']} | {c['b']} | {c['items']} | {c['acc_difference']:+.4f} | "
              + _interval_cells(c) for c in accuracy_comparisons(records)]
    return "\n".join(lines)


def comparison_table(records: list[dict]) -> str:
    """Markdown: for each pair at one sparsity, log ppl(a) - log ppl(b) with its 95 % interval."""
    lines = ["| sparsity | a | b | log ppl(a) - log ppl(b) | 95% interval | significant |", "|---|---|---|---|---|---|"]
    lines += [f"| {c['sparsity']:.0%} | {c['a']} | {c['b']} | {c['log_ppl_difference']:+.4f} | " + _interval_cells(c)
              for c in comparisons(records)]
    return "\n".join(lines)


def verdict_table(records: list[dict]) -> str:
    """Markdown: does WINA beat each rival at each sparsity, under each recipe and allocation?
    Each cell is log ppl(WINA) - log ppl(rival) on the same windows with its 95 % paired
    interval, and who is ahead when the interval excludes 0 ("level" otherwise).  TEAL runs
    with WINA's recipe and allocation; R-Sparse and CATS exist with the default recipe and
    uniform sparsity only, and CATS drops far fewer weights at the same target."""
    def find(method, recipe, allocation, sparsity):
        return next((r for r in records if r["method"] == method and not r["orthogonalize"]
                     and r.get("recipe", "default") == recipe and r["allocation"] == allocation
                     and r.get("selection", "topk") == "topk" and r["sparsity"] == sparsity
                     and r.get("window_nll")), None)

    def cell(wina, rival, name):
        if wina is None or rival is None:
            return "-"
        c = paired_difference(wina["window_nll"], rival["window_nll"], wina["window_tokens"])
        who = ("WINA" if c["log_ppl_difference"] < 0 else name) if c["significant"] else "level"
        return f"{c['log_ppl_difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] {who}"

    lines = ["| sparsity | WINA as | vs TEAL (same recipe, allocation) | vs R-Sparse | vs CATS |",
             "|---|---|---|---|---|"]
    for sparsity in sorted({r["sparsity"] for r in records if r["method"] == "wina"}):
        for recipe, allocation in [("default", "uniform"), ("paper", "uniform"), ("default", "greedy"),
                                   ("paper", "greedy")]:
            wina = find("wina", recipe, allocation, sparsity)
            if wina is None:
                continue
            rivals = [cell(wina, find("teal", recipe, allocation, sparsity), "TEAL"),
                      cell(wina, find("rsparse", "default", "uniform", sparsity), "R-Sparse"),
                      cell(wina, find("cats", "default", "uniform", sparsity), "CATS")]
            lines.append(f"| {sparsity:.0%} | {recipe}, {allocation} | " + " | ".join(rivals) + " |")
    return "\n".join(lines)

