"""Multiple-choice accuracy through lm-evaluation-harness, on the task files wina-fx ships.

Each shipped task (``wina_fx/data/tasks/<name>.jsonl``: context, choices, label) becomes an
lm-eval task read with ``dataset_path: json`` from the installed file, so nothing is
downloaded; the model (dense, or compiled with ``backend="wina"``) is scored through
``HFLM(pretrained=<model object>)``.  The numbers are lm-eval's: ``acc`` and ``acc_norm``
(log-likelihood over the choice's bytes) with their standard errors.
"""
from __future__ import annotations

import os
import tempfile
from importlib import resources

from .tasks import TASKS

_TEMPLATE = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def task_name(name: str) -> str:
    return f"wina_fx_{name}"


def write_tasks(folder: str, names) -> None:
    """One lm-eval task YAML per shipped task, reading the installed JSONL file."""
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; valid choices: {', '.join(map(repr, TASKS))}")
        path = resources.files("wina_fx.data").joinpath("tasks").joinpath(f"{name}.jsonl")
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            f.write(_TEMPLATE.format(task=task_name(name), path=os.fspath(path)))


def harness_accuracy(model, tokenizer, names, limit: int | None = None, batch_size: int = 16) -> dict:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "items"}} of ``model``
    scored by lm-evaluation-harness on the first ``limit`` items of each shipped task (all by
    default); "items": each item's acc (0 or 1) in item order, what a paired comparison of two
    configurations on the same items needs (``wina_fx.stats.paired_accuracy_difference``)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the data files are local
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as folder:
        write_tasks(folder, names)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=[task_name(n) for n in names], limit=limit,
                              task_manager=TaskManager(include_path=folder), log_samples=True)
    results = {}
    for name in names:
        r = out["results"][task_name(name)]
        results[name] = {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "acc_norm": r["acc_norm,none"],
                         "acc_norm_stderr": r["acc_norm_stderr,none"], "n": out["n-samples"][task_name(name)]["effective"],
                         "items": [int(x["acc"]) for x in sorted(out["samples"][task_name(name)], key=lambda x: x["doc_id"])]}
    return results
