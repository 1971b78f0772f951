"""Draft verification (spec §3.5): pure functions over logits / probabilities.

Letters are fixed: ``p`` = anchor distribution (clean position), ``q`` = draft distribution (MASK
position). Each function checks drafts left to right, stops at the first rejection, and returns a
``Verdict``: how many drafts were accepted and, on rejection, the corrected token.

Modes:
* greedy (T = 0): accept iff draft == argmax p; correction = argmax p. Exactly greedy AR.
* exact (T > 0, our default): drafts were *sampled* from q; accept with min(1, p(x)/q(x)), else
  resample from norm(max(0, p - q)). This is speculative sampling, so each emitted token is
  distributed exactly as p (which already includes temperature / top-k / top-p).
* coupled (T > 0): drafts and the anchor pick token k with the same keyed noise E_k (Gumbel-max);
  a draft is accepted iff it equals the anchor's pick, so the output is exactly the keyed AR draw.
* reference (T > 0): what the reference system does: argmax drafts, q = softmax(draft logits / T)
  evaluated at the argmax, p un-truncated. The proposal is a point mass, so this only approximates
  p; kept for comparison with published numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Verdict:
    accepted: int  # number of leading drafts accepted
    correction: int | None  # token replacing the first rejected draft (None if all accepted)


def verify_greedy(anchor_logits: torch.Tensor, specs: list[int]) -> Verdict:
    """anchor_logits: (len(specs), V); row j is the anchor for specs[j]."""
    if not specs:
        return Verdict(0, None)
    best = torch.argmax(anchor_logits, dim=-1).tolist()
    for j, (x, b) in enumerate(zip(specs, best)):
        if x != b:
            return Verdict(j, b)
    return Verdict(len(specs), None)


def verify_sampled(p: torch.Tensor, q: torch.Tensor, specs: list[int], gen: torch.Generator | None) -> Verdict:
    """Speculative-sampling test. p, q: (len(specs), V) probabilities; specs[j] ~ q[j].

    Accept specs[j] with probability min(1, p[j, x] / q[j, x]); on rejection draw the correction from
    norm(max(0, p[j] - q[j])) (from p[j] if that residual is empty, which needs p == q)."""
    if not specs:
        return Verdict(0, None)
    idx = torch.tensor(specs)
    rows = torch.arange(len(specs))
    px, qx = p[rows, idx], q[rows, idx]
    u = torch.rand(len(specs), generator=gen)
    ok = (u * qx <= px).tolist()  # u < p/q without dividing (q may be 0 only if never sampled)
    for j, good in enumerate(ok):
        if not good:
            resid = (p[j] - q[j]).clamp_min(0)
            total = resid.sum()
            dist = resid / total if total > 0 else p[j]
            return Verdict(j, int(torch.multinomial(dist, 1, generator=gen)))
    return Verdict(len(specs), None)


def verify_keyed(p: torch.Tensor, specs: list[int], noise: torch.Tensor) -> Verdict:
    """Coupled test. p: (len(specs), V) target probabilities; noise: the Exp(1) rows of the specs'
    output indices. The anchor's own pick argmax(p / noise) is the token the text gets; specs[j] is
    accepted iff it equals that pick, and otherwise the pick is the correction. Exact because the
    emitted token is always the anchor's keyed draw."""
    if not specs:
        return Verdict(0, None)
    best = torch.argmax(p / noise, dim=-1).tolist()
    for j, (x, b) in enumerate(zip(specs, best)):
        if x != b:
            return Verdict(j, b)
    return Verdict(len(specs), None)
