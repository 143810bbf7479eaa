"""Evaluation on real text: perplexity over fixed-length windows."""
from __future__ import annotations

import math

import torch


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
def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over all windows.

    ``model(ids)`` must return logits (or an object with ``.logits``) of shape
    (1, T, vocab); each window predicts its tokens 1..T-1 from the ones before.
    """
    total_nll, total_tokens = 0.0, 0
    for ids in windows:
        out = model(ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        logits = logits[:, :-1].float()
        targets = ids[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += targets.numel()
    return math.exp(total_nll / total_tokens)
