"""I-DLM losses (spec §2.1–2.2): CE_noisy, CE_clean, fixed or auto-balanced combination, and the
per-offset draft accuracy; optionally soft targets for the MASK rows and acceptance-weighted draft
offsets (``NoisyTarget``, see ``distill.py``).

Only rows that carry a loss are projected to the vocabulary: the hidden rows are gathered first and
the output head runs on them in chunks. When there is more than one chunk, each runs under
activation checkpointing, so at most one (chunk, vocab) logit block is alive at a time, in the forward
and in the backward (a single chunk is kept: recomputing it would only cost time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..model.decoder import Decoder
from .batch import IGNORE, TrainBatch
from .distill import MIX_KL_WEIGHT, OBJECTIVES, SOFT, chain_agreement, soft_divergence
from .forward import Halves

AUTO_BALANCE_EPS = 1e-8


@dataclass(frozen=True)
class LossWeights:
    """How CE_clean is combined with CE_noisy."""

    alpha: float = 0.2  # fixed weight of CE_clean (ignored with auto_balance)
    auto_balance: bool = False  # weight = stopgrad(CE_noisy) / stopgrad(CE_clean)
    use_clean: bool = True  # False in LoRA mode: the clean half is the frozen base, CE_clean is a constant


@dataclass(frozen=True)
class NoisyTarget:
    """What the MASK rows are trained against (``--objective``, ``--distill-*``, ``--accept-weighting``)."""

    objective: str = "ce"  # ce | kl | rkl | tvd | mix (distill.py)
    temperature: float = 1.0  # of p and q in the soft divergences
    top_k: int = 0  # coarsen p and q to p's top k tokens + a tail bucket; 0 = full vocabulary
    reach: tuple[float, ...] | None = None  # per-offset weights w_1..w_B (acceptance weighting); None = off

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.temperature > 0 or self.top_k < 0:
            raise ValueError("the distillation temperature must be > 0 and top-k >= 0")

    @property
    def soft(self) -> bool:
        """A divergence from p is part of the loss (everything but ce)."""
        return self.objective != "ce"

    @property
    def needs_teacher(self) -> bool:
        """The clean rows' logits are needed (soft targets, or the agreement counts of acceptance
        weighting); plain ce takes the original, teacher-free path."""
        return self.soft or self.reach is not None


PLAIN_CE = NoisyTarget()  # the default: hard CE on the MASK rows, unweighted


@dataclass
class LossOutput:
    """One micro-batch's loss and statistics (statistics are detached)."""

    loss: torch.Tensor  # scalar to backpropagate (already divided by the given normalisers)
    ce_noisy: torch.Tensor  # scalar: sum of noisy CE / noisy normaliser (unweighted, whatever the objective)
    ce_clean: torch.Tensor | None  # scalar: sum of clean CE / clean normaliser; None if not computed
    draft_correct: torch.Tensor  # (B,) long: top-1 hits of MASKs at offset k = 1..B
    draft_count: torch.Tensor  # (B,) long: MASKs scored at offset k = 1..B
    soft_noisy: torch.Tensor | None = None  # scalar: sum of the (unweighted) divergence from p / noisy
    #   normaliser; kl for mix; None for ce
    agree_correct: torch.Tensor | None = None  # (B,) long: MASKs with argmax q == argmax p (None: no teacher)
    chain_accepted: torch.Tensor | None = None  # (B,) long: reached MASKs that agree (chain_agreement)
    chain_reached: torch.Tensor | None = None  # (B,) long: MASKs whose earlier drafts in the block all agree


def chunked_ce(model: Decoder, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 1024
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy and top-1 predictions of ``hidden`` (N, H) against ``targets`` (N,),
    through ``model.logits`` (fp32, MASK never a valid output), ``chunk`` rows at a time."""
    total = hidden.sum().float() * 0.0  # keeps the graph connected when no row carries a loss
    preds = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start:start + chunk], targets[start:start + chunk]
        if torch.is_grad_enabled() and h.requires_grad and hidden.shape[0] > chunk:
            loss, pred = checkpoint(_ce_block, model, h, t, use_reentrant=False)
        else:
            loss, pred = _ce_block(model, h, t)
        total = total + loss
        preds.append(pred)
    pred = torch.cat(preds) if preds else targets.new_zeros(0)
    return total, pred


def _ce_block(model: Decoder, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model.logits(h)  # (chunk, vocab) fp32
    return F.cross_entropy(logits, t, reduction="sum"), logits.detach().argmax(-1)


@dataclass
class SoftSums:
    """``chunked_soft``'s sums over all rows and its per-row argmaxes."""

    objective: torch.Tensor  # Σ w_r · loss_r of the chosen objective (differentiable)
    ce: torch.Tensor  # Σ CE_r (detached)
    soft: torch.Tensor  # Σ divergence_r (detached; 0 for ce)
    pred: torch.Tensor  # (K,) argmax q
    teacher_pred: torch.Tensor  # (K,) argmax p


def chunked_soft(model: Decoder, hidden: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                 row_weights: torch.Tensor | None, target: NoisyTarget, chunk: int = 1024) -> SoftSums:
    """The MASK rows' objective against the teacher rows: ``hidden`` (K, H) are the MASK rows (q),
    ``teacher`` (K, H) the clean rows predicting the same tokens (p; projected without gradient),
    ``targets`` (K,) the response tokens (for ce / mix and the CE statistic), ``row_weights`` (K,)
    optional per-row weights (acceptance weighting). ``chunk`` rows at a time, checkpointed like
    ``chunked_ce``."""
    zero = hidden.sum().float() * 0.0  # keeps the graph connected when no row carries a loss
    obj, ce, soft = zero, zero.detach(), zero.detach()
    preds, tpreds = [], []
    for start in range(0, hidden.shape[0], chunk):
        part = slice(start, start + chunk)
        w = None if row_weights is None else row_weights[part]
        args = (model, hidden[part], teacher[part], targets[part], w, target)
        if torch.is_grad_enabled() and hidden.requires_grad and hidden.shape[0] > chunk:
            o, c, s, p, tp = checkpoint(_soft_block, *args, use_reentrant=False)
        else:
            o, c, s, p, tp = _soft_block(*args)
        obj, ce, soft = obj + o, ce + c, soft + s
        preds.append(p)
        tpreds.append(tp)
    empty = targets.new_zeros(0)
    pred = torch.cat(preds) if preds else empty
    return SoftSums(obj, ce, soft, pred, torch.cat(tpreds) if tpreds else empty)


def _soft_block(model: Decoder, h: torch.Tensor, hc: torch.Tensor, t: torch.Tensor, w: torch.Tensor | None,
                target: NoisyTarget) -> tuple[torch.Tensor, ...]:
    logits = model.logits(h)  # (chunk, vocab) fp32: q
    with torch.no_grad():
        p_logits = model.logits(hc.detach())  # p: a constant, in full mode too
    if target.objective in SOFT:  # the hard CE is only a statistic here
        with torch.no_grad():
            ce = F.cross_entropy(logits.detach(), t, reduction="none")
    else:
        ce = F.cross_entropy(logits, t, reduction="none")
    kind = "kl" if target.objective == "mix" else target.objective
    div = soft_divergence(logits, p_logits, kind, target.temperature, target.top_k) if kind in SOFT else None
    if target.objective == "ce":
        per_row = ce
    elif target.objective == "mix":
        per_row = MIX_KL_WEIGHT * div + (1 - MIX_KL_WEIGHT) * ce
    else:
        per_row = div
    obj = (per_row * w).sum() if w is not None else per_row.sum()
    soft = div.detach().sum() if div is not None else ce.new_zeros(())
    return obj, ce.detach().sum(), soft, logits.detach().argmax(-1), p_logits.argmax(-1)


def teacher_rows(clean: torch.Tensor, batch: TrainBatch, sel: torch.Tensor) -> torch.Tensor:
    """(K, H) detached clean-half hidden states that predict the same tokens as the selected MASK
    rows ``hidden.noisy[sel]``, in the same order (same sample, same position: the logit shift of
    both halves is the same, spec §1.5)."""
    rows = torch.nonzero(sel)[:, 0]
    return clean.detach()[rows, batch.clean_index[sel]]


def idlm_loss(model: Decoder, hidden: Halves, batch: TrainBatch, weights: LossWeights,
              noisy_norm: float | None = None, clean_norm: float | None = None,
              chunk: int = 1024, target: NoisyTarget = PLAIN_CE) -> LossOutput:
    """CE_noisy over masked response slots with a valid next label, divided by ``noisy_norm``
    (default: the batch's response tokens); CE_clean over the response targets of the clean half,
    divided by ``clean_norm`` (default: their count). Pass normalisers counted over a whole
    gradient-accumulation group (and all ranks) to make accumulation exact.

    ``target`` replaces CE_noisy by a soft objective against the clean rows' distribution at the
    same positions, and/or weights each MASK row by its offset's reach weight; the sum is divided by
    the same ``noisy_norm``. Auto-balance then balances CE_clean against that noisy term. The default
    (ce, unweighted) takes the original teacher-free path."""
    sel = batch.noisy_targets != IGNORE  # (R, m)
    tgt = batch.noisy_targets[sel]
    k = batch.draft_k[sel]
    norm = noisy_norm or max(batch.n_response, 1)
    extra: dict[str, torch.Tensor | None] = {}
    if not target.needs_teacher:
        noisy_sum, pred = chunked_ce(model, hidden.noisy[sel], tgt, chunk)
        noisy = ce_noisy = noisy_sum / norm
    else:
        row_w = None
        if target.reach is not None:
            reach = torch.tensor(target.reach, dtype=torch.float32, device=tgt.device)
            row_w = reach[(k - 1).clamp(max=len(target.reach) - 1)]
        sums = chunked_soft(model, hidden.noisy[sel], teacher_rows(hidden.clean, batch, sel), tgt, row_w,
                            target, chunk)
        noisy, ce_noisy, pred = sums.objective / norm, sums.ce / norm, sums.pred
        agree = sums.pred == sums.teacher_pred
        extra["soft_noisy"] = sums.soft / norm if target.soft else None
        extra["agree_correct"] = draft_accuracy(sums.pred, sums.teacher_pred, k, batch.block)[0]
        extra["chain_accepted"], extra["chain_reached"] = chain_agreement(agree, k, batch.block)
    correct, count = draft_accuracy(pred, tgt, k, batch.block)
    loss, ce_clean = noisy, None
    if weights.use_clean:
        csel = batch.clean_targets != IGNORE
        clean_sum, _ = chunked_ce(model, hidden.clean[csel], batch.clean_targets[csel], chunk)
        ce_clean = clean_sum / (clean_norm or max(int(csel.sum()), 1))
        w = (noisy.detach() / (ce_clean.detach() + AUTO_BALANCE_EPS) if weights.auto_balance
             else weights.alpha)
        loss = noisy + w * ce_clean
        ce_clean = ce_clean.detach()
    return LossOutput(loss, ce_noisy.detach(), ce_clean, correct, count, **extra)


def draft_accuracy(pred: torch.Tensor, target: torch.Tensor, k: torch.Tensor, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-offset (k = 1..B) top-1 hits and counts of scored MASKs."""
    hits = torch.zeros(block + 1, dtype=torch.long, device=pred.device)
    count = torch.zeros(block + 1, dtype=torch.long, device=pred.device)
    hits.index_add_(0, k, (pred == target).long())
    count.index_add_(0, k, torch.ones_like(k))
    return hits[1:], count[1:]
