"""Soft targets for the MASK rows and acceptance-weighted draft positions (``idlm convert --objective``,
``--accept-weighting``).

**Soft targets.** The MASK row that predicts the token at position t is trained against the clean
row's next-token distribution p at the same t (the row of the same sample at the same position,
``TrainBatch.clean_index``), computed in the same training forward: in LoRA mode the clean half *is*
the frozen base, in full mode p is detached. With q the MASK row's distribution (both at temperature T):

* ``kl``  = KL(p‖q) = Σ p (log p − log q)  (forward KL, mass-covering), scaled by T²;
* ``rkl`` = KL(q‖p) = Σ q (log q − log p)  (reverse KL, mode-seeking), scaled by T²;
* ``tvd`` = ½ Σ |p − q|  (total variation; 1 − TVD is speculative sampling's acceptance probability);
* ``mix`` = ``MIX_KL_WEIGHT``·kl + (1 − ``MIX_KL_WEIGHT``)·ce, ce being the hard CE on the response token
  at T = 1.

The T² factor (Hinton et al.) keeps the gradient scale of kl/rkl independent of T. Each divergence is
exactly 0 where q = p. The soft term is summed over the same MASK rows as CE_noisy (response positions
with a next token) and divided by the same normaliser; in full mode auto-balance scales CE_clean to
the value of this noisy term. The hard CE of the MASK rows is still logged (``ce_noisy``).

**Top-k truncation** (``top_k > 0``) coarsens both distributions to p's k most likely tokens plus
one *tail* bucket that holds the rest of the mass (of p and of q respectively). The divergence of
the coarsened pair is well defined for every objective (the reverse KL needs no smoothing), is 0
where q = p and, by the data-processing inequality, never exceeds the full-vocabulary divergence.
Memory is bounded by the loss chunk either way (``--loss-chunk`` rows of logits at a time).

**Acceptance weighting.** Greedy ISD accepts the drafts of a step left to right and stops at the first
rejection, so the MASK at draft offset k (k = 1..B after the last clean token) only matters when
drafts 1..k−1 were accepted. ``reach_weights`` gives offset k the weight
``w_k = a_1 · … · a_(k−1)`` (w_1 = 1), where a_i = P(draft i accepted | drafts 1..i−1 accepted).
The estimator: a training row "accepts" its draft when argmax q == argmax p (greedy ISD's test, with
the data's prefix standing in for the accepted drafts: exact when the responses are the base model's
own greedy answers, as ``idlm data generate`` writes them). Each step counts, per offset i, the MASK rows
whose earlier drafts in the same block all agreed (``reached``) and those of them that agree too
(``accepted``); a_i = A_i / R_i with A, R exponentially discounted sums of those counts over optimizer
steps (``ACCEPT_DECAY`` per step, summed over all micro-batches and ranks). An offset with no
evidence yet has a_i = 1, so the first step is unweighted. Weights are computed from the steps before
the current one and carry no gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OBJECTIVES = ("ce", "kl", "rkl", "tvd", "mix")
SOFT = ("kl", "rkl", "tvd")  # the pure divergences; mix adds CE to kl
MIX_KL_WEIGHT = 0.5  # mix = 0.5·kl + 0.5·ce
ACCEPT_DECAY = 0.9  # per-step discount of the acceptance counts (a window of ~10 steps)
LOGIT_FLOOR = -1e4  # a -inf logit (an in-vocabulary MASK column) is replaced by this in p and q: its
#   probability stays exactly 0 in fp32, and no -inf meets -inf in a difference (NaN)


def soft_divergence(q_logits: torch.Tensor, p_logits: torch.Tensor, kind: str, temperature: float = 1.0,
                    top_k: int = 0) -> torch.Tensor:
    """Per-row divergence (K,) of the student q (``q_logits`` (K, V), differentiable) from the
    teacher p (``p_logits`` (K, V), treated as a constant) for ``kind`` in kl | rkl | tvd."""
    if kind not in SOFT:
        raise ValueError(f"soft divergence must be one of {', '.join(SOFT)}, got {kind!r}")
    z = q_logits.float() if temperature == 1.0 else q_logits.float() / temperature
    with torch.no_grad():
        y = p_logits.detach().float() if temperature == 1.0 else p_logits.detach().float() / temperature
        # a row sum is non-finite iff the row holds ±inf (or NaN); cheaper than an elementwise test
        finite = bool(torch.isfinite(y.sum(-1)).all() and torch.isfinite(z.detach().sum(-1)).all())
        bad = None if finite else ~(torch.isfinite(y) & torch.isfinite(z))
    if bad is not None:
        z, y = z.masked_fill(bad, LOGIT_FLOOR), y.masked_fill(bad, LOGIT_FLOOR)
    scale = temperature ** 2 if kind != "tvd" else 1.0
    if kind == "kl" and not 0 < top_k < z.shape[-1]:
        return kl_from_logits(z, y) * scale
    lq, lp = F.log_softmax(z, -1), F.log_softmax(y, -1)
    if 0 < top_k < lq.shape[-1]:
        idx = lp.topk(top_k, -1).indices
        lq, lp = bucket_top_k(lq, idx), bucket_top_k(lp, idx)
    return divergence(lq, lp, kind) * scale


def kl_from_logits(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """KL(softmax(y)‖softmax(z)) per row (K,) for finite (K, V) logits, differentiable in z only.

    KL = Σ p·y − Σ p·z + logsumexp(z) − logsumexp(y), with p = softmax(y): the row dot products run as
    batched matmuls and the backward, (softmax(z) − p)·g, works in place, so the student side costs
    about what a cross-entropy does (each (K, V) temporary of the textbook formula costs a fresh
    allocation, which dominates on a CPU). z = y gives exactly 0."""
    with torch.no_grad():
        y = y.detach()
        p = F.softmax(y, -1)
        const = _row_dot(p, y) - y.logsumexp(-1)
    return _KLFromLogits.apply(z, p, const)


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_j a[i, j]·b[i, j] per row in fp32 (autocast off: it would round bmm's inputs to bf16),
    without a (K, V) temporary."""
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).reshape(a.shape[0])


class _KLFromLogits(torch.autograd.Function):
    """kl = const − Σ p·z + logsumexp(z) per row; d kl / dz = softmax(z) − p."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        lse = z.logsumexp(-1)
        ctx.save_for_backward(z, p, lse)
        return const - _row_dot(p, z) + lse

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, p, lse = ctx.saved_tensors
        g = z - lse.unsqueeze(-1)  # the one (K, V) temporary
        g.exp_().sub_(p).mul_(grad.unsqueeze(-1))
        return g, None, None


def bucket_top_k(logprobs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(K, V) log-probabilities → (K, k+1): the entries at ``idx`` (K, k), then the log of the
    remaining mass (logsumexp of every other entry)."""
    head = logprobs.gather(-1, idx)
    tail = logprobs.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([head, tail], -1)


def divergence(lq: torch.Tensor, lp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row kl = KL(p‖q), rkl = KL(q‖p) or tvd of two (K, S) log-probability tensors."""
    if kind == "kl":
        return (lp.exp() * (lp - lq)).sum(-1)
    if kind == "rkl":
        return (lq.exp() * (lq - lp)).sum(-1)
    return 0.5 * (lq.exp() - lp.exp()).abs().sum(-1)


def chain_agreement(agree: torch.Tensor, k: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-offset (k = 1..B) counts for the acceptance estimator from scored MASK rows in row order
    (``agree`` (K,) bool: argmax q == argmax p; ``k`` (K,) their draft offsets, each block a run
    starting at k = 1): ``reached`` = rows whose earlier drafts of the block all agree, ``accepted`` =
    those that agree too. Returns (accepted, reached), each (B,) long."""
    acc = torch.zeros(block + 1, dtype=torch.long, device=k.device)
    rch = torch.zeros(block + 1, dtype=torch.long, device=k.device)
    if k.numel() == 0:
        return acc[1:], rch[1:]
    if int(k[0]) != 1:
        raise ValueError("chain_agreement: every block of scored MASK rows must start at offset k = 1")
    bad = (~agree).long()
    before = bad.cumsum(0) - bad  # disagreements strictly before each row (whole sequence)
    start = torch.nonzero(k == 1).flatten()
    seg = (k == 1).long().cumsum(0) - 1  # block index of each row
    reached = before == before[start][seg]  # no disagreement earlier in the block
    acc.index_add_(0, k, (reached & agree).long())
    rch.index_add_(0, k, reached.long())
    return acc[1:], rch[1:]


def update_acceptance(accepted: list[float], reached: list[float], new_accepted: list[float],
                      new_reached: list[float], decay: float = ACCEPT_DECAY
                      ) -> tuple[list[float], list[float]]:
    """One step of the discounted sums A ← decay·A + accepted, R ← decay·R + reached (per offset;
    the lists grow when a curriculum stage adds offsets)."""
    size = max(len(accepted), len(new_accepted))

    def step(old: list[float], new: list[float]) -> list[float]:
        old = old + [0.0] * (size - len(old))
        new = list(new) + [0.0] * (size - len(new))
        return [decay * o + float(v) for o, v in zip(old, new)]

    return step(accepted, new_accepted), step(reached, new_reached)


def acceptance_rates(accepted: list[float], reached: list[float], block: int) -> list[float]:
    """a_i = A_i / R_i for offsets i = 1..block; 1.0 where there is no evidence (R_i = 0)."""
    out = []
    for i in range(block):
        r = reached[i] if i < len(reached) else 0.0
        out.append(min(1.0, accepted[i] / r) if r > 0 else 1.0)
    return out


def reach_weights(accepted: list[float], reached: list[float], block: int) -> tuple[float, ...]:
    """w_k = a_1 · … · a_(k−1) for k = 1..block (w_1 = 1): the estimated probability that greedy ISD
    gets to look at the draft at offset k."""
    rates = acceptance_rates(accepted, reached, block)
    out, w = [], 1.0
    for a in rates:
        out.append(w)
        w *= a
    return tuple(out)
