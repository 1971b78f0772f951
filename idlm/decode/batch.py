"""Batched AR generation of left-padded prompts with our decoder (used to make self-distillation data).

Rows are left-padded to a common width; each row's positions start at 0 at its first real token and a
key-validity mask hides the padding. Rows that finish keep stepping (their output is cut at the stop
token) until every row is done, which keeps the batch rectangular.
"""

from __future__ import annotations

import torch

from ..model.decoder import Decoder


@torch.inference_mode()
def batched_generate(model: Decoder, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                     temperature: float = 0.0, gen: torch.Generator | None = None, pad_id: int = 0) -> list[list[int]]:
    """Generate for each prompt; each output ends at (and includes) its first stop token."""
    b = len(prompts)
    width = max(map(len, prompts))
    pads = torch.tensor([width - len(p) for p in prompts])  # (B,)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # (B, W)
    valid = torch.arange(width)[None, :] >= pads[:, None]  # (B, W)
    pos = (torch.arange(width)[None, :] - pads[:, None]).clamp_min(0)
    cache = model.new_cache(batch=b, capacity=width + max_new_tokens + 1)
    logits = model.logits(model.hidden(ids, pos, cache, key_valid=valid)[:, -1])  # (B, V)
    out = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        if temperature > 0:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen).squeeze(1)
        else:
            nxt = logits.argmax(-1)
        for r, t in enumerate(nxt.tolist()):
            if not done[r]:
                out[r].append(t)
                done[r] = t in stop_ids
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        valid = torch.cat([valid, torch.ones(b, 1, dtype=torch.bool)], 1)
        pos = (cache.length - pads)[:, None]
        logits = model.logits(model.hidden(nxt[:, None], pos, cache, key_valid=valid)[:, -1])
    return out
