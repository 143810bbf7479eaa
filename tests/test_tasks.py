"""Multiple-choice tasks: the shipped files, and accuracy by log-likelihood against a plain loop."""
import re
import zlib

import pytest
import torch
from tiny_models import tiny_model

from wina_fx.tasks import TASKS, Item, choice_logliks, load_task, multiple_choice_accuracy


@pytest.mark.parametrize("name", TASKS)
def test_shipped_task_is_well_formed(name):
    items = load_task(name)
    assert 400 <= len(items) <= 600
    assert len({(it.context, it.choices) for it in items}) == len(items)  # no duplicates
    for it in items:
        assert isinstance(it.context, str) and it.context.strip() and it.context == it.context.rstrip()
        assert len(it.choices) == 4 and len(set(it.choices)) == 4
        assert all(c.startswith(" ") and len(c) > 1 and c.isascii() for c in it.choices)
        assert 0 <= it.label < 4
    labels = [it.label for it in items]
    assert min(labels.count(k) for k in range(4)) > len(items) / 8  # the answer is not always in one place


def test_bad_task_name_names_the_valid_ones():
    with pytest.raises(ValueError, match="wordnet_gloss"):
        load_task("hellaswag")


class WordTokenizer:
    """GPT-2-like toy tokenizer: a word carries its leading space; ids by a fixed hash."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        pieces = re.findall(r" ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]|\s", text)
        return {"input_ids": [3 + zlib.crc32(p.encode()) % 93 for p in pieces]}


def direct_logliks(model, tokenizer, items):
    """One unpadded sequence at a time: sum over the choice's tokens of log p(token | all before)."""
    scores = []
    for it in items:
        row = []
        for choice in it.choices:
            ctx = tokenizer(it.context.rstrip())["input_ids"]  # trailing spaces go with the choice
            seq = ctx + tokenizer(it.context + choice)["input_ids"][len(ctx):]
            logprobs = torch.log_softmax(model(torch.tensor([seq]), use_cache=False).logits[0].double(), dim=-1)
            row.append(sum(logprobs[t - 1, seq[t]].item() for t in range(len(ctx), len(seq))))
        scores.append(row)
    return scores


def small_items():
    real = [load_task(name)[k] for name in TASKS for k in range(2)]
    made = [
        Item("The cat sat on the ", (" mat.", " moon and the stars.", " x"), 2),  # trailing space moves
        Item("1 + 1 =", (" 2", " 3"), 0),
    ]
    return real + made


def test_accuracy_matches_a_direct_computation():
    model, _ = tiny_model("llama", vocab=96)
    tokenizer = WordTokenizer()
    items = small_items()
    shapes = []

    def recording(ids, **kwargs):
        shapes.append(tuple(ids.shape))
        return model(ids, **kwargs)

    got = choice_logliks(recording, tokenizer, items, batch_size=3, pad_multiple=8)
    want = direct_logliks(model, tokenizer, items)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-3)
    assert all(b == 3 and length % 8 == 0 for b, length in shapes)

    acc = sum(max(range(len(w)), key=w.__getitem__) == it.label for w, it in zip(want, items))
    acc_norm = sum(
        max(range(len(w)), key=lambda k: w[k] / len(it.choices[k])) == it.label for w, it in zip(want, items)
    )
    result = multiple_choice_accuracy(model, tokenizer, items, batch_size=4, pad_multiple=16)
    assert result == {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def test_scores_do_not_depend_on_batching_or_padding():
    model, _ = tiny_model("llama", vocab=96)
    items = small_items()
    a = choice_logliks(model, WordTokenizer(), items, batch_size=1, pad_multiple=1)
    b = choice_logliks(model, WordTokenizer(), items, batch_size=5, pad_multiple=64)
    assert sum(a, []) == pytest.approx(sum(b, []), abs=1e-4)
