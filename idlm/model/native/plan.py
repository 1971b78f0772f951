"""A model's weights registered with the native forward (``Plan``), the per-row key layout it reads
(``NativeRows``), and whether a model can run natively (``unsupported``, ``describe``)."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from .build import ops, why

log = logging.getLogger(__name__)


def describe(model) -> str:
    """One line: which forward ``model``'s inference runs, and why when it is not the native one."""
    if model.runs_native:
        return "native"
    reason = unsupported(model) or why() or "turned off for this model"
    return f"python ({reason})"



@dataclass
class NativeRows:
    """Who attends to what, for the native forward: token t of the batch belongs to table row
    ``seq[t]`` (-1: padding) and sees that sequence's logical keys [0, ctx[t]) plus logical key
    ``ws[t] + j`` for each j with ``win[t, j]`` (an ISD window's own slots). Keys are visited in
    logical order, so a row's keys, and hence its bits, do not depend on the batch layout."""

    seq: torch.Tensor  # (T,) int64
    ctx: torch.Tensor  # (T,) int64
    ws: torch.Tensor  # (T,) int64
    win: torch.Tensor  # (T, W) uint8 (W may be 0)
    tables: torch.Tensor  # (R, blocks) int64 block tables; empty: logical key k is pool slot k
    block_size: int = 1


_EMPTY = torch.empty(0, dtype=torch.long)


class Plan:
    """A model's weights registered with the extension (one handle; released with the plan).

    ``fresh(model)`` tells whether the plan still matches the model: the same quantization, dtype and
    projection modules (no adapter added, no layer quantized since) and the same in-place versions of
    the adapters (not trained or reloaded since). Dense weights and norms are not checked: the plan
    shares their storage, so in-place changes reach it anyway. About 30 us a forward."""

    def __init__(self, model):
        self.quant_mode, self.dtype = model.quant_mode, model.dtype
        self.projs = _projections(model)
        self.watched = [(t, _version(t)) for t in _adapters(self.projs)]
        self.embed, self.norm = model._modules["embed"], model._modules["norm"]
        tensors, meta = _collect(model)
        self.handle = int(ops().plan_create(tensors, meta, float(model.cfg.rms_eps)))
        self._tensors = tensors  # keep the derived tensors (fused [W; A], scale · B) alive
        weakref.finalize(self, _release, self.handle)

    def fresh(self, model) -> bool:
        if model.quant_mode != self.quant_mode or model.dtype != self.dtype:
            return False
        mods = model._modules
        if mods["embed"] is not self.embed or mods["norm"] is not self.norm:
            return False
        it = iter(self.projs)
        for layer in mods["layers"]._modules.values():
            lm = layer._modules
            for name in _PROJ_NAMES:
                if lm[name] is not next(it, None):
                    return False
        if next(it, None) is not None:
            return False
        return all(_version(t) == v for t, v in self.watched)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gated: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor, rows: NativeRows) -> torch.Tensor:
        return ops().forward(self.handle, x, cos, sin, gated, k, v, write_slots, rows.seq, rows.ctx, rows.ws,
                             rows.win, rows.tables, rows.block_size)


def _release(handle: int) -> None:
    try:
        ops().plan_release(handle)
    except Exception as e:  # noqa: BLE001 - at interpreter shutdown the op registry may be gone
        log.debug("idlm: releasing native plan %d: %s", handle, e)


def unsupported(model) -> str | None:
    """Why ``model`` cannot run natively (None when it can)."""
    cfg = model.cfg
    if model.dtype != torch.bfloat16:
        return "native forward is bf16 only"
    if model.embed.weight.device.type != "cpu":
        return "native forward is CPU only"
    if cfg.head_dim % 16 or cfg.head_dim > 1024:
        return f"head_dim {cfg.head_dim} (needs a multiple of 16, at most 1024)"
    if (cfg.num_heads // cfg.num_kv_heads) * (cfg.head_dim // 16) > 256:
        return "more than 256 query vectors of 16 per K/V head"
    return None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change in place)
        return None


_PROJ_NAMES = ("qkv", "o", "gate_up", "down")


def _projections(model) -> list:
    return [layer._modules[name] for layer in model.layers._modules.values() for name in _PROJ_NAMES]


def _adapters(projs: list) -> list[torch.Tensor]:
    return [t for p in projs for t in (p._parameters.get("lora_A"), p._parameters.get("lora_B")) if t is not None]


# ---- weights -> the plan's tensor list and meta ----------------------------------------------------

_DENSE = 0  # Kind in forward.cpp; quantized layers use their QuantLinear.code (4 / 8 / 14 / 18)
_NONE = torch.empty(0)


def _lin(q=None, w: torch.Tensor | None = None, bias: torch.Tensor | None = None, cols: int = 0):
    """One linear: ([w, scales, bias], [kind, cols]) from a QuantLinear ``q`` or a dense bf16 ``w``."""
    if q is not None:
        kind = q.code
        b = q.qbias if q.qbias is not None else _NONE
        return [q.packed, q.scales, b], [kind, q.out_features]
    if w is not None:
        b = _NONE if bias is None else bias.detach().float().contiguous()
        return [w.detach().to(torch.bfloat16).contiguous(), _NONE, b], [_DENSE, cols or w.shape[0]]
    return [_NONE, _NONE, _NONE], [-1, 0]


def _proj(p) -> tuple[list, list]:
    """A decoder projection (plain, quantized, gated LoRA over either) as main / A / B linears."""
    out = p.out_features
    quant = p._modules.get("quant")
    has_lora = hasattr(p, "lora_A")
    rank = p.rank if has_lora else 0
    a = b = ([_NONE] * 3, [-1, 0])
    fused = False
    if quant is not None:
        main = _lin(q=quant)
        if has_lora:
            fused = quant.out_features == out + rank
            if not fused:
                a = _lin(w=p.lora_A)
            bq = p._modules.get("lora_b_quant")
            b = _lin(q=bq) if bq is not None else _lin(w=p._scaled_b(torch.bfloat16))
    elif has_lora:
        fw, fb = p._fused(torch.bfloat16)
        main = _lin(w=fw, bias=fb)
        fused = True
        b = _lin(w=p._scaled_b(torch.bfloat16))
    else:
        main = _lin(w=p.weight, bias=p.bias)
    tensors = main[0] + a[0] + b[0]
    meta = [out, rank, int(fused)] + main[1] + a[1] + b[1]
    return tensors, meta


def _collect(model) -> tuple[list[torch.Tensor], list[int]]:
    cfg = model.cfg
    bf = torch.bfloat16
    tensors: list[torch.Tensor] = []
    meta = [cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size]
    for layer in model.layers:
        tensors += [layer.ln1.weight.detach().to(bf).contiguous(), layer.ln2.weight.detach().to(bf).contiguous()]
        if cfg.qk_norm:
            tensors += [layer.q_norm.weight.detach().to(bf).contiguous(), layer.k_norm.weight.detach().to(bf).contiguous()]
        else:
            tensors += [_NONE, _NONE]
        for name in ("qkv", "o", "gate_up", "down"):
            t, m = _proj(getattr(layer, name))
            tensors += t
            meta += m
    tensors.append(model.norm.weight.detach().to(bf).contiguous())
    return tensors, meta
