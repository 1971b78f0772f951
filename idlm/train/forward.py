"""Training forwards over a ``TrainBatch``: final-normed hidden states of the noisy and clean halves.

* ``forward_joint`` (full mode): one ``Decoder.hidden`` call over ``[x_t | x_0]`` with the §1.4 mask;
  gradients flow through both halves.
* ``forward_clean_prefix`` (LoRA mode): the clean half runs once under ``no_grad`` with base weights
  (gate off), keeping each layer's K/V; the noisy half then runs alone, attending to
  ``[clean K/V ; its own K/V]`` with the noisy rows of the same mask. With the gate off on x_0 and
  x_0 never attending to x_t, the clean K/V are exactly the base model's, so this equals the joint
  forward while skipping the clean half's backward.

The second path needs a layer step that takes a K/V prefix *and* an arbitrary mask, which
``Decoder.hidden`` does not offer (a ``KVCache`` implies causal attention and is written in place,
which autograd cannot differentiate through): ``Layer.forward_over`` composes the layer's own
``project`` and ``finish`` around an SDPA over ``[past ; new]``; ``tests/train/test_forward.py``
checks it against the joint forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model import kernels
from ..model.decoder import Decoder
from .batch import TrainBatch


@dataclass
class Halves:
    """Final-normed hidden states of one micro-batch."""

    noisy: torch.Tensor  # (R, m, H): x_t half, predicts noisy_targets
    clean: torch.Tensor  # (R, n, H): x_0 half, predicts clean_targets (no grad in LoRA mode)


def forward_joint(model: Decoder, batch: TrainBatch) -> Halves:
    """One pass over ``[x_t | x_0]`` (full fine-tuning; also the reference for the LoRA path)."""
    m = batch.n_noisy
    gate = torch.cat([batch.gate, torch.zeros_like(batch.clean_targets, dtype=batch.gate.dtype)], 1)
    h = model.hidden(batch.input_ids, batch.positions, attn_mask=batch.attn_mask, gate=gate)
    return Halves(h[:, :m], h[:, m:])


def forward_clean_prefix(model: Decoder, batch: TrainBatch) -> Halves:
    """Clean half once without gradients (base weights), then the noisy half over its K/V."""
    m = batch.n_noisy
    ids_t, ids_0 = batch.input_ids[:, :m], batch.input_ids[:, m:]
    pos_t, pos_0 = batch.positions[:, :m], batch.positions[:, m:]
    mask = batch.attn_mask[:, None]  # (R, 1, m+n, m+n)
    mask_clean = mask[..., m:, m:]  # (R, 1, n, n)
    mask_noisy = torch.cat([mask[..., :m, m:], mask[..., :m, :m]], -1)  # keys = [clean ; noisy]
    gate = batch.gate[..., None].to(model.dtype)  # (R, m, 1)
    with torch.no_grad(), kernels.pytorch_kernels():  # training: PyTorch's (fastest) kernels, rows need not be stable
        x = model.embed(ids_0)
        cos, sin = _rope(model, pos_0)
        kv = []
        for layer in model.layers:
            x, k_v = layer.forward_over(x, cos, sin, mask_clean, None)
            kv.append(k_v)
        clean = model.norm(x)
    x = model.embed(ids_t)
    cos, sin = _rope(model, pos_t)
    for layer, past in zip(model.layers, kv):
        x, _ = layer.forward_over(x, cos, sin, mask_noisy, gate, past)
    return Halves(model.norm(x), clean)


def _rope(model: Decoder, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = model.rope.lookup(positions, model.dtype)
    return cos[:, None], sin[:, None]  # (R, 1, T, D)
