"""Turning logits into the distribution a token is drawn from, and drawing it.

One function, ``target_probs``, defines the sampling distribution for a set of ``SamplingParams``
(temperature, then top-k, then top-p, renormalised). AR sampling, the ISD anchor p and the ISD
draft q in exact mode all use it, so temperature / top-k / top-p mean the same thing everywhere.

Two sources of randomness:

* a ``torch.Generator`` consumed in order (``draw``): the exact and reference modes;
* ``KeyedNoise``: one Exp(1) vector per *output index*, a pure function of (seed, index). The coupled
  mode picks token k as ``argmax(probs_k / E_k)`` (the exponential race, i.e. the Gumbel-max trick):
  an exact draw from probs_k, and the same draw whoever asks: AR, ISD at any stride, a request
  alone or in any batch, before or after a preemption. A draft for index k uses the same E_k, so it
  is accepted exactly when it equals the token the anchor would pick.
"""

from __future__ import annotations

import torch

from ..config import SamplingParams

_MASK64 = (1 << 64) - 1


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


def pick(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None,
         noise: KeyedNoise | None = None, index: int = 0) -> list[int]:
    """The AR rule for (n, V) logit rows predicting output indices index..index+n-1: argmax at T = 0,
    a keyed draw when ``noise`` is given (coupled mode), else draws from ``gen``."""
    if params.greedy:
        return torch.argmax(logits, dim=-1).tolist()
    probs = target_probs(logits, params)
    if noise is not None:
        return keyed_argmax(probs, noise.rows(index, len(logits)))
    return draw(probs, gen).tolist()


def keyed_argmax(probs: torch.Tensor, noise: torch.Tensor) -> list[int]:
    """argmax(probs / noise) per row: with noise ~ Exp(1) iid, an exact draw from each row of probs."""
    return torch.argmax(probs / noise, dim=-1).tolist()


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class KeyedNoise:
    """Exp(1) noise vectors over the vocabulary, one per output index, keyed by (seed, index).

    Vectors are made on first use and kept until ``forget_before`` drops the ones behind the text."""

    def __init__(self, seed: int, vocab: int):
        self.seed, self.vocab = seed, vocab
        self._rows: dict[int, torch.Tensor] = {}

    def at(self, index: int) -> torch.Tensor:
        row = self._rows.get(index)
        if row is None:
            g = torch.Generator().manual_seed(_splitmix64(_splitmix64(self.seed) ^ index))
            row = torch.empty(self.vocab).exponential_(generator=g).clamp_min_(torch.finfo(torch.float32).tiny)
            self._rows[index] = row
        return row

    def rows(self, first: int, n: int) -> torch.Tensor:
        """(n, V): the vectors of indices first..first+n-1."""
        return torch.stack([self.at(first + i) for i in range(n)]) if n else torch.empty(0, self.vocab)

    def forget_before(self, index: int) -> None:
        for k in [k for k in self._rows if k < index]:
            del self._rows[k]
