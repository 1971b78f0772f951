"""I-DLM losses (spec §2.1–2.2): CE_noisy, CE_clean, fixed or auto-balanced combination, and the
per-offset draft accuracy.

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
from .forward import Halves

AUTO_BALANCE_EPS = 1e-8


@dataclass(frozen=True)
class LossWeights:
    """How CE_clean is combined with CE_noisy."""

    alpha: float = 0.2  # fixed weight of CE_clean (ignored with auto_balance)
    auto_balance: bool = False  # weight = stopgrad(CE_noisy) / stopgrad(CE_clean)
    use_clean: bool = True  # False in LoRA mode: the clean half is the frozen base, CE_clean is a constant


@dataclass
class LossOutput:
    """One micro-batch's loss and statistics (statistics are detached)."""

    loss: torch.Tensor  # scalar to backpropagate (already divided by the given normalisers)
    ce_noisy: torch.Tensor  # scalar: sum of noisy CE / noisy normaliser
    ce_clean: torch.Tensor | None  # scalar: sum of clean CE / clean normaliser; None if not computed
    draft_correct: torch.Tensor  # (B,) long: top-1 hits of MASKs at offset k = 1..B
    draft_count: torch.Tensor  # (B,) long: MASKs scored at offset k = 1..B


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


def idlm_loss(model: Decoder, hidden: Halves, batch: TrainBatch, weights: LossWeights,
              noisy_norm: float | None = None, clean_norm: float | None = None,
              chunk: int = 1024) -> LossOutput:
    """CE_noisy over masked response slots with a valid next label, divided by ``noisy_norm``
    (default: the batch's response tokens); CE_clean over the response targets of the clean half,
    divided by ``clean_norm`` (default: their count). Pass normalisers counted over a whole
    gradient-accumulation group (and all ranks) to make accumulation exact."""
    sel = batch.noisy_targets != IGNORE  # (R, m)
    tgt = batch.noisy_targets[sel]
    noisy_sum, pred = chunked_ce(model, hidden.noisy[sel], tgt, chunk)
    ce_noisy = noisy_sum / (noisy_norm or max(batch.n_response, 1))
    correct, count = draft_accuracy(pred, tgt, batch.draft_k[sel], batch.block)
    loss, ce_clean = ce_noisy, None
    if weights.use_clean:
        csel = batch.clean_targets != IGNORE
        clean_sum, _ = chunked_ce(model, hidden.clean[csel], batch.clean_targets[csel], chunk)
        ce_clean = clean_sum / (clean_norm or max(int(csel.sum()), 1))
        w = (ce_noisy.detach() / (ce_clean.detach() + AUTO_BALANCE_EPS) if weights.auto_balance
             else weights.alpha)
        loss = ce_noisy + w * ce_clean
        ce_clean = ce_clean.detach()
    return LossOutput(loss, ce_noisy.detach(), ce_clean, correct, count)


def draft_accuracy(pred: torch.Tensor, target: torch.Tensor, k: torch.Tensor, block: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-offset (k = 1..B) top-1 hits and counts of scored MASKs."""
    hits = torch.zeros(block + 1, dtype=torch.long, device=pred.device)
    count = torch.zeros(block + 1, dtype=torch.long, device=pred.device)
    hits.index_add_(0, k, (pred == target).long())
    count.index_add_(0, k, torch.ones_like(k))
    return hits[1:], count[1:]
