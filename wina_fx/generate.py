"""Greedy decoding that only calls ``model(ids)``: works with any compiled callable."""
from __future__ import annotations

import torch


@torch.no_grad()
def greedy_generate(model, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` (1, T), recomputing the
    whole prefix each step (no KV cache), stopping early at ``eos_token_id``."""
    ids = input_ids
    for _ in range(max_new_tokens):
        out = model(ids, use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out
        next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_id.to(ids.device)], dim=-1)
        if eos_token_id is not None and int(next_id) == eos_token_id:
            break
    return ids
