"""Gated LoRA for R-ISD (spec §4) and a trainable MASK embedding row.

``GatedLoRAProj`` wraps one of the decoder's ``Proj`` layers::

    y = W x + b + gate · (alpha / rank) · B(A x)

``gate`` is the per-token (B, T, 1) tensor that ``Decoder.hidden`` threads through every projection.
``gate=None`` means LoRA OFF, so prefill and every path that passes no gate is exactly the base model.
With a gate, the low-rank term is added only to the rows whose gate is non-zero, so clean positions
stay bit-identical to the base model. In training that is index_select → A → B → index_add; in
decoding A is fused into the base matmul (``[W; A]``, one call instead of two) and only B runs on
the gated rows.

The MASK row (``MaskEmbedding``) is a separate one-row parameter used only where the input id is
MASK; clean positions never read it, so training it keeps the anchor lossless too.

Adapters are never merged into the base weights: merging would change the clean path.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .decoder import Decoder, Proj

LORA_TARGETS = ("qkv", "o", "gate_up", "down")  # every projection of a decoder layer
MASK_ROW_KEY = "mask_embedding"  # key of the trained MASK row in an adapter state dict
ALPHA_KEY = "lora_alpha"  # 0-dim tensor: the LoRA alpha (scale = alpha / rank)


class GatedLoRAProj(Proj):
    """A ``Proj`` plus a gated low-rank update; shares (does not copy) the base weight and bias."""

    def __init__(self, base: Proj, rank: int, alpha: float):
        nn.Module.__init__(self)  # skip nn.Linear's allocation: reuse the base parameters
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # standard LoRA init: B = 0, so ΔW = 0

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if "quant" in self._modules:
            return self._quant_forward(x, gate)
        if gate is None:
            return kernels.linear(x, self.weight, self.bias, self.by_row)
        if not torch.is_grad_enabled() and gate_is_binary(gate):
            return self._decode_forward(x, gate)
        y = kernels.linear(x, self.weight, self.bias, self.by_row)
        rows = gated_rows(gate)  # (R,) flat indices into B*T
        if rows.numel() == 0:
            return y
        flat_x = x.reshape(-1, self.in_features)
        g = gate.reshape(-1, 1).index_select(0, rows).to(x.dtype)  # (R, 1)
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # fp32 adapters over a bf16 base
        delta = F.linear(F.linear(flat_x.index_select(0, rows), a), b)  # (R, out)
        delta = delta * (g * self.scale)
        # in place on the fresh matmul output (linear's backward does not need it): no copy of y
        y.view(-1, self.out_features).index_add_(0, rows, delta.to(y.dtype))
        return y

    def _decode_forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Inference with a 0/1 gate. One matmul with ``[W; A]`` gives every row's base output and its
        A x (the base columns are bit-identical to ``x Wᵀ`` alone: tests/train/test_lora.py); then
        ``y += gate · (scale · B (A x))`` on every row. A clean row adds exactly 0, so it stays the
        base model bit for bit; a gated row's delta is the same whatever rows share the batch."""
        fused, fused_bias = self._fused(x.dtype)
        y_ext = kernels.linear(x, fused, fused_bias, self.by_row)  # (..., out + rank)
        y, t = y_ext[..., : self.out_features], y_ext[..., self.out_features:]
        y.addcmul_(kernels.linear(t, self._scaled_b(x.dtype), None, self.by_row), gate.to(x.dtype).view(*x.shape[:-1], 1))
        return y

    def _quant_forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """Quantized base (inference only): y = Q(x) + gate · (scale · B (A x)). ``quantize_model`` packs
        A as extra output rows of the same kernel (quantized like W), as the dense path fuses ``[W; A]``,
        and scale · B into the int8 kernel; an adapter added after quantization runs densely. A clean
        row (gate 0) adds exactly 0, so it stays the quantized base model bit for bit."""
        if torch.is_grad_enabled() and (self.lora_A.requires_grad or self.lora_B.requires_grad):
            raise RuntimeError("a quantized base is for inference; train adapters over a dense base")
        y = self.quant(x)
        n = self.out_features
        if y.shape[-1] == n:
            if gate is None:
                return y
            t = kernels.linear(x, self.lora_A.to(x.dtype), None, self.by_row)
        else:
            y, t = y[..., :n], y[..., n:]
            if gate is None:
                return y
        b_quant = self._modules.get("lora_b_quant")
        delta = b_quant(t) if b_quant is not None else kernels.linear(t, self._scaled_b(x.dtype), None, self.by_row)
        return y.addcmul_(delta, gate.to(x.dtype).view(*x.shape[:-1], 1))

    def _fused(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[W; A]`` (out + rank, in) and ``[b; 0]``, built once per A. The base weight becomes a view
        of the fused buffer's first rows, so the model holds one copy of W."""
        cached = getattr(self, "_fused_cache", None)
        if cached is not None and cached[0] == self._fused_key(dtype):
            return cached[1], cached[2]
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: W stays usable in training
            fused = torch.cat([self.weight.detach().to(dtype), self.lora_A.detach().to(dtype)])
            if dtype == self.weight.dtype and not self.weight.requires_grad:
                self.weight.data = fused[: self.out_features]
            bias = None if self.bias is None else torch.cat([self.bias.detach().to(dtype),
                                                             self.bias.new_zeros(self.rank, dtype=dtype)])
        self._fused_cache = (self._fused_key(dtype), fused, bias)
        return fused, bias

    def _fused_key(self, dtype: torch.dtype) -> tuple:
        return (_version(self.lora_A), self.lora_A.data_ptr(), _version(self.weight), self.weight.data_ptr(), dtype)

    def _scaled_b(self, dtype: torch.dtype) -> torch.Tensor:
        """scale * B in ``dtype``, cached for inference until B changes (its version counter)."""
        key = (_version(self.lora_B), self.lora_B.data_ptr(), dtype, self.scale)
        cached = getattr(self, "_b_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, (self.lora_B.detach() * self.scale).to(dtype))
            self._b_cache = cached
        return cached[1]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _version(t: torch.Tensor) -> int | None:
    """In-place change counter (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def gated_rows(gate: torch.Tensor) -> torch.Tensor:
    """Flat indices of the non-zero gate entries. One gate tensor is shared by every projection of
    every layer in a forward, so the indices are cached on it, keyed by its version counter (an
    in-place update of a persistent gate invalidates the cache)."""
    # inference-mode tensors have no version counter; decoders build a fresh gate per forward
    version = _version(gate)
    cached = getattr(gate, "_idlm_rows", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    rows = gate.reshape(-1).nonzero().squeeze(1)
    gate._idlm_rows = (version, rows)  # type: ignore[attr-defined]
    return rows


def gate_is_binary(gate: torch.Tensor) -> bool:
    """True when every gate entry is 0 or 1 (decoding); cached on the gate like ``gated_rows``."""
    version = _version(gate)
    cached = getattr(gate, "_idlm_binary", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    binary = bool(((gate == 0) | (gate == 1)).all())
    gate._idlm_binary = (version, binary)  # type: ignore[attr-defined]
    return binary


class MaskEmbedding(nn.Embedding):
    """The base embedding (frozen) with a separate trainable row used only at MASK inputs."""

    def __init__(self, base: nn.Embedding, mask_token_id: int):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = base.weight
        self.mask_token_id = mask_token_id
        self.mask_row = nn.Parameter(base.weight.detach()[mask_token_id].clone())  # (H,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        is_mask = (ids == self.mask_token_id)[..., None]
        return torch.where(is_mask, self.mask_row.to(out.dtype), out)


def add_lora(model: Decoder, rank: int, alpha: float, targets: Iterable[str] = LORA_TARGETS,
             train_mask_row: bool = True) -> list[nn.Parameter]:
    """Freeze ``model`` and wrap the ``targets`` projections of every layer with gated LoRA.
    With ``train_mask_row`` the MASK embedding row becomes trainable too. Returns the new
    trainable parameters. Idempotent per projection (an already wrapped one is kept)."""
    targets = tuple(targets)
    bad = set(targets) - set(LORA_TARGETS)
    if bad:
        raise ValueError(f"unknown LoRA targets {sorted(bad)} (choose from {', '.join(LORA_TARGETS)})")
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for layer in model.layers:
        for name in targets:
            proj = getattr(layer, name)
            if not isinstance(proj, GatedLoRAProj):
                proj = GatedLoRAProj(proj, rank, alpha)
                setattr(layer, name, proj)
            params += [proj.lora_A, proj.lora_B]
    if train_mask_row:
        params.append(enable_mask_row(model))
    for p in params:
        p.requires_grad_(True)
    return params


def enable_mask_row(model: Decoder) -> nn.Parameter:
    """Give ``model`` a separate trainable MASK embedding row; returns it."""
    if not isinstance(model.embed, MaskEmbedding):
        model.embed = MaskEmbedding(model.embed, model.cfg.mask_token_id)
    return model.embed.mask_row


def lora_modules(model: Decoder) -> dict[str, GatedLoRAProj]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLoRAProj)}


def lora_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Adapter tensors only: ``<module>.lora_A`` / ``.lora_B``, the alpha and, if trained, the MASK row."""
    mods = lora_modules(model)
    if not mods:
        return {MASK_ROW_KEY: model.embed.mask_row.detach()} if isinstance(model.embed, MaskEmbedding) else {}
    return lora_state_from(dict(model.named_parameters()), next(iter(mods.values())).alpha)


def lora_state_from(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """The adapter tensors of a Decoder state dict (the module's parameters, or a state gathered from FSDP
    shards): ``<module>.lora_A`` / ``.lora_B``, the alpha and, if present, the MASK row."""
    out = {ALPHA_KEY: torch.tensor(float(alpha))}
    out.update({k: v.detach() for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))})
    if "embed.mask_row" in state:
        out[MASK_ROW_KEY] = state["embed.mask_row"].detach()
    return out


def load_lora(model: Decoder, state: dict[str, torch.Tensor], alpha: float | None = None) -> Decoder:
    """Wrap ``model`` with adapters shaped like ``state`` and load them (inference: frozen).
    ``alpha`` defaults to the one stored in ``state``. A MASK row in ``state`` is written into the
    embedding (it is read only at MASK inputs, so the clean path stays the base model)."""
    if alpha is None:
        if ALPHA_KEY not in state:
            raise ValueError(f"adapter state has no {ALPHA_KEY!r}; pass alpha")
        alpha = float(state[ALPHA_KEY])
    ranks = {k.rsplit(".", 1)[0]: v.shape[0] for k, v in state.items() if k.endswith(".lora_A")}
    if not ranks:
        raise ValueError("adapter state has no lora_A tensors")
    if len(set(ranks.values())) != 1:
        raise ValueError(f"mixed LoRA ranks are not supported: {sorted(set(ranks.values()))}")
    targets = sorted({name.rsplit(".", 1)[1] for name in ranks})
    add_lora(model, next(iter(ranks.values())), alpha, targets, train_mask_row=False)
    copy_lora_state(model, state)
    return model.requires_grad_(False)


def copy_lora_state(model: Decoder, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights (and a MASK row, if any) from ``state`` into the adapters already on
    ``model``: loading for inference, or warm-starting training (``idlm convert --init-from``)."""
    mods = lora_modules(model)
    with torch.no_grad():
        for name, m in mods.items():
            a, b = state.get(f"{name}.lora_A"), state.get(f"{name}.lora_B")
            if a is None or b is None:
                raise ValueError(f"adapter state lacks {name}")
            if a.shape != m.lora_A.shape or b.shape != m.lora_B.shape:
                raise ValueError(f"adapter {name}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not match "
                                 f"{tuple(m.lora_A.shape)}/{tuple(m.lora_B.shape)} (different rank?)")
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
        if MASK_ROW_KEY in state:
            row = state[MASK_ROW_KEY].to(model.embed.weight.dtype)
            if isinstance(model.embed, MaskEmbedding):
                model.embed.mask_row.copy_(row)
            else:
                model.embed.weight[model.cfg.mask_token_id] = row
