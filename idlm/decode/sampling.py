"""Turning logits into the distribution a token is drawn from, and drawing it.

One function, ``target_probs``, defines the sampling distribution for a set of ``SamplingParams``
(temperature, then top-k, then top-p, renormalised). AR sampling, the ISD anchor p and the ISD
draft q in exact mode all use it, so temperature / top-k / top-p mean the same thing everywhere.
"""

from __future__ import annotations

import torch

from ..config import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """(..., V) fp32 logits -> (..., V) probabilities after T, top-k, top-p. Requires T > 0."""
    x = logits.float() / params.temperature
    if params.top_k and params.top_k < x.shape[-1]:
        kth = torch.topk(x, params.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop = before >= params.top_p  # keep the smallest prefix reaching top_p (first token always kept)
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One sample per row of (..., V) probabilities -> (...) int64."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=gen).squeeze(-1)
    return out.reshape(probs.shape[:-1])


def next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """The AR rule for one (V,) logit row: argmax at T = 0, else a draw from ``target_probs``."""
    if params.greedy:
        return int(torch.argmax(logits))
    return int(draw(target_probs(logits, params), gen))


def make_generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
