"""Training forwards over a ``TrainBatch``: final-normed hidden states of the noisy and clean halves.

* ``forward_joint`` (full mode): one ``Decoder.hidden`` call over ``[x_t | x_0]`` with the §1.4 mask;
  gradients flow through both halves.
* ``forward_clean_prefix`` (LoRA mode): the clean half runs once under ``no_grad`` with base weights
  (gate off), keeping each layer's K/V; the noisy half then runs alone, attending to
  ``[clean K/V ; its own K/V]`` with the noisy rows of the same mask. With the gate off on x_0 and
  x_0 never attending to x_t, the clean K/V are exactly the base model's, so this equals the joint
  forward while skipping the clean half's backward.

The second path needs a layer forward that takes a K/V prefix *and* an arbitrary mask, which
``Decoder.hidden`` does not offer (a ``KVCache`` implies causal attention and is written in place,
which autograd cannot differentiate through). ``_layer`` below is therefore a functional copy of
``decoder.Layer.forward``; ``tests/train/test_forward.py`` checks it against the joint forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..model.decoder import Decoder, Layer
from ..model.rope import apply_rotary
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
    with torch.no_grad():
        x = model.embed(ids_0)
        cos, sin = _rope(model, pos_0)
        kv = []
        for layer in model.layers:
            x, k_v = _layer(layer, x, cos, sin, mask_clean, None)
            kv.append(k_v)
        clean = model.norm(x)
    x = model.embed(ids_t)
    cos, sin = _rope(model, pos_t)
    for layer, past in zip(model.layers, kv):
        x, _ = _layer(layer, x, cos, sin, mask_noisy, gate, past)
    return Halves(model.norm(x), clean)


def _rope(model: Decoder, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = model.rope.lookup(positions, model.dtype)
    return cos[:, None], sin[:, None]  # (R, 1, T, D)


def _layer(layer: Layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
           gate: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``decoder.Layer.forward`` with an optional K/V prefix ``past`` (concatenated, not written in
    place) and an explicit mask over ``[past ; new]``. Returns the output and this call's own K/V."""
    cfg = layer.cfg
    b, t, _ = x.shape
    q, k, v = layer.qkv(layer.ln1(x), gate).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(b, t, cfg.num_heads, cfg.head_dim)
    k = k.view(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q, k = layer.q_norm(q), layer.k_norm(k)
    q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, D)
    k = apply_rotary(k.transpose(1, 2), cos, sin)  # (B, Hkv, T, D)
    v = v.view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                       enable_gqa=cfg.num_kv_heads != cfg.num_heads)
    x = x + layer.o(o.transpose(1, 2).reshape(b, t, cfg.q_size), gate)
    g, u = layer.gate_up(layer.ln2(x), gate).chunk(2, dim=-1)
    return x + layer.down(F.silu(g) * u, gate), (k, v)
