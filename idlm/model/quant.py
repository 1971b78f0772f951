"""Weight-only quantized linear layers for CPU inference: int4 group-wise and int8 per channel.

The kernels are idlm's own (``native/wmm.cpp``): 4-bit codes in groups of ``GROUP`` input columns
(w = q · s + m, fp32 s and m per group) or int8 codes with one fp32 scale per output row, with bf16
activations (``int4`` / ``int8``) or activations quantized to int8 per row and group of 32 inside the
kernel (``w4a8`` / ``w8a8``: exact integer dot products). Every row goes through the same operations
whatever the number of rows, so a row's bits never depend on the batch: the property bit-exact ISD
needs. Where the native code cannot be built (no C++ compiler), ``int4`` / ``int8`` fall back to
PyTorch's ``_weight_int4pack_mm_for_cpu`` / ``_weight_int8pack_mm`` (bf16 scales), whose row stability
``rowcheck`` checks at load, and the int8-activation modes are refused.

Where the weights come from:

* GGUF Q4_0 / Q4_1 / Q4_K tensors are packed straight from their blocks under ``int4`` (the 4-bit
  codes are kept; the block scale and minimum are exact in fp32). Every other case (Q8_0, Q6_K, ...
  blocks, or Q4 blocks under ``int8``) is re-quantized from the blocks' exact fp32 values, never from
  a rounded dense copy: the int8 kernel has one scale per row, not per block. A fused projection may
  mix types (a Q4_K_M file keeps some attn_v at Q6_K): part by part.
* dense (safetensors, bf16 / fp32) weights are quantized at load: int4 asymmetric min/max per group
  of 32, int8 symmetric per output row.

A layer a kernel cannot take (int4: input dim not a multiple of the group; int8: not a multiple of
16) stays dense: it is listed in the ``QuantReport``; nothing is silently wrong. An output dim not a
multiple of 16 is padded with zero rows (sliced off after the matmul).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..config import QUANT_CHOICES, QUANT_MODES  # noqa: F401 (QUANT_CHOICES re-exported)
from . import native
from .kernels import per_row

GROUP = 32  # int4 group size: GGUF's block size, and the smallest the kernel accepts
_N_ALIGN = 16  # the int4 packer needs the output dim divisible by this
_INNER_K_TILES = 2
COMPUTE_DTYPE = torch.bfloat16  # the kernels' activation and scale dtype


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W stored as int4 (group-wise) or int8 (per row) codes; no autograd."""

    def __init__(self, kind: str, out_features: int, in_features: int, packed: torch.Tensor,
                 scales: torch.Tensor, bias: torch.Tensor | None = None, source: str = "dense", fmt: str = "aten",
                 act: str = "bf16"):
        super().__init__()
        if fmt not in ("aten", "idlm"):
            raise ValueError(f"unknown packing {fmt!r}")
        if act not in ("bf16", "int8") or (act == "int8" and fmt != "idlm"):
            raise ValueError(f"activations {act!r} need idlm's kernel")
        if kind not in ("int4", "int8"):
            raise ValueError(f"unknown quantized kind {kind!r}")
        why = quantizable(kind, out_features, in_features, act)
        if why is not None:  # the kernels return wrong numbers for such shapes: never build one
            raise ValueError(f"{kind} kernel cannot take a ({out_features}, {in_features}) weight: {why}")
        self.kind, self.out_features, self.in_features, self.source = kind, out_features, in_features, source
        self.fmt = fmt  # "idlm": idlm's kernel (native/wmm.cpp, fp32 bias); "aten": PyTorch's (bf16 bias)
        self.act = act  # "int8": activations quantized per row and group of 32 inside the kernel (W4A8 / W8A8)
        self.code = (4 if kind == "int4" else 8) + (10 if act == "int8" else 0)  # wmm.cpp's kind
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales, persistent=False)
        bias_dtype = torch.float32 if fmt == "idlm" else COMPUTE_DTYPE
        self.register_buffer("qbias", None if bias is None else bias.to(bias_dtype), persistent=False)

    by_row = False  # set by ``rowcheck`` when this machine's kernel failed the check: one row per call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.in_features
        flat = x.reshape(-1, k)
        if flat.dtype != COMPUTE_DTYPE:
            flat = flat.to(COMPUTE_DTYPE)
        flat = flat.contiguous()
        y = per_row(self._matmul, flat) if self.by_row else self._matmul(flat)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def _matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if self.fmt == "idlm":
            return native.ops().wmm(flat, self.packed, self.scales, self.code, self.out_features, self.qbias)
        if self.kind == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales)
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        else:
            y = torch.ops.aten._weight_int8pack_mm(flat, self.packed, self.scales)
        return y if self.qbias is None else y + self.qbias

    def extra_repr(self) -> str:
        acts = ", int8 activations" if self.act == "int8" else ""
        return f"{self.kind}, in={self.in_features}, out={self.out_features}, from {self.source}, {self.fmt} kernel{acts}"


def uses_idlm_kernel(act: str = "bf16") -> bool:
    """True when new quantized layers are packed for idlm's own kernels (``native/wmm.cpp``, every CPU the
    native code builds on), else for PyTorch's (bf16 activations only; int8 activations then have no
    kernel)."""
    return native.load()


def int4_reference(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the int4 kernel computes with: (codes − 8) · scale + zero; PyTorch's kernel
    stores scale and zero rounded to bf16, idlm's keeps them in fp32."""
    if uses_idlm_kernel():
        s, z = scale.float(), zero.float()
    else:
        s, z = scale.to(COMPUTE_DTYPE).float(), zero.to(COMPUTE_DTYPE).float()
    return (codes.float() - 8) * s.repeat_interleave(GROUP, 1) + z.repeat_interleave(GROUP, 1)


def int4_from_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    bias: torch.Tensor | None = None, source: str = "dense", act: str = "bf16") -> QuantLinear:
    """codes (N, K) in 0..15, scale / zero (N, K/GROUP) fp32, w = (codes − 8) · scale + zero."""
    n, k = codes.shape
    if act == "int8" or uses_idlm_kernel():
        packed, params = native.ops().int4_pack(codes, scale.float(), zero.float() - 8 * scale.float(), act == "int8")
        return QuantLinear("int4", n, k, packed, params, bias, source, fmt="idlm", act=act)
    pad = (-n) % _N_ALIGN
    if pad:
        codes = torch.cat([codes, codes.new_full((pad, k), 8)])
        scale = torch.cat([scale, scale.new_zeros(pad, scale.shape[1])])
        zero = torch.cat([zero, zero.new_zeros(pad, zero.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), _INNER_K_TILES)
    sz = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(COMPUTE_DTYPE)  # (K/G, N, 2)
    return QuantLinear("int4", n, k, packed, sz, bias, source)


def int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per group of GROUP input columns → (codes, scale, zero). The
    scale and zero are rounded to bf16 first and the codes chosen against the rounded values."""
    n, k = w.shape
    wg = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).to(COMPUTE_DTYPE).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: any scale works
    zero = (lo + 8 * scale).to(COMPUTE_DTYPE).float()
    codes = ((wg - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15).to(torch.int32)
    return codes.reshape(n, k), scale, zero


def int4_from_dense(w: torch.Tensor, bias: torch.Tensor | None = None) -> QuantLinear:
    """``int4_codes`` packed."""
    return _pack(_dense_spec(w, "int4"), bias, "dense")


def int8_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: scale = max|w| / 127 (rounded to bf16), codes = round(w / scale)."""
    w = w.float()
    scale = (w.abs().amax(1) / 127).to(COMPUTE_DTYPE).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / scale[:, None]).round().clamp(-128, 127).to(torch.int8), scale


def int8_from_dense(w: torch.Tensor, bias: torch.Tensor | None = None, source: str = "dense",
                    act: str = "bf16") -> QuantLinear:
    """``int8_codes`` as a layer."""
    return _pack(_dense_spec(w, "int8"), bias, source, act=act)


def _pack(spec: tuple, bias: torch.Tensor | None, source: str, extra: torch.Tensor | None = None,
          act: str = "bf16") -> QuantLinear:
    """A layer from codes: spec ("int4", codes, scale, zero) or ("int8", codes, scale). ``extra`` (r, K)
    dense rows (a gated LoRA's A) are quantized the same way and appended as output rows r: one
    kernel call gives x Wᵀ and x Aᵀ (the W columns are bit-identical to W's alone: tests)."""
    kind = spec[0]
    if extra is not None:
        more = int4_codes(extra) if kind == "int4" else int8_codes(extra)
        spec = (kind, *(torch.cat([a, b.to(a.dtype)]) for a, b in zip(spec[1:], more)))
        if bias is not None:
            bias = torch.cat([bias, bias.new_zeros(extra.shape[0])])
    if kind == "int4":
        q = int4_from_codes(spec[1], spec[2], spec[3], bias, source, act)
    elif act == "int8" or uses_idlm_kernel():
        packed, params = native.ops().int8_pack(spec[1], spec[2].float(), act == "int8")
        q = QuantLinear("int8", spec[1].shape[0], spec[1].shape[1], packed, params, bias, source, fmt="idlm", act=act)
    else:
        q = QuantLinear("int8", spec[1].shape[0], spec[1].shape[1], spec[1].contiguous(), spec[2].to(COMPUTE_DTYPE),
                        bias, source)
    return q


# ---- GGUF blocks ---------------------------------------------------------------------------------

GGUF_BLOCK = 32
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "Q4_K": 144}  # bytes per block of 32 (Q4_K: of 256)
_Q4 = ("Q4_0", "Q4_1", "Q4_K")  # 4-bit codes the int4 kernel takes as they are


def gguf_blocks(qtype: str, data: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Split GGUF rows (N, bytes) of one tensor into codes and per-32-column parameters.

    Q4_0: w = d · (q − 8) → codes q (N, K) 0..15, d (N, K/32) and m = None.
    Q4_1: w = d · q + m   → codes q 0..15, d, m.
    Q4_K: 256-column super-blocks of eight 32-column sub-blocks with 6-bit scale sc and min mn:
          w = (d · sc) · q − dmin · mn → codes q 0..15, per sub-block d · sc and −dmin · mn (so w = d · q + m).
    Q8_0: w = d · q       → codes q (N, K) int8, d, None.
    Scales are fp32 (exactly the fp16 values stored; Q4_K's products of two such values are exact in fp32)."""
    if qtype not in _BLOCK_BYTES:
        raise ValueError(f"GGUF tensor type {qtype} is not packed directly (supported: {', '.join(_BLOCK_BYTES)})")
    n = data.shape[0]
    if qtype == "Q4_K":
        return _q4_k_blocks(np.ascontiguousarray(data).reshape(n, k // 256, 144), n, k)
    nb = k // GGUF_BLOCK
    blocks = np.ascontiguousarray(data).reshape(n, nb, _BLOCK_BYTES[qtype])
    d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32))
    if qtype == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return q, d, None
    off = 2 if qtype == "Q4_0" else 4
    m = None if qtype == "Q4_0" else torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    qs = torch.from_numpy(blocks[..., off:].copy()).to(torch.int32)  # (N, nb, 16)
    q = torch.cat([qs & 0xF, qs >> 4], -1)  # element j < 16 in the low nibble of byte j, j ≥ 16 in the high
    return q.reshape(n, k), d, m


def _q4_k_blocks(blocks: np.ndarray, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K super-blocks (N, K/256, 144 bytes: d, dmin fp16, 12 bytes of 6-bit scales/mins, 128 of codes)."""
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # (N, S)
    dmin = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    sc8 = torch.from_numpy(blocks[..., 4:16].copy()).to(torch.int32)  # (N, S, 12)
    lo = sc8[..., :4]
    hi = sc8[..., 4:8]
    tail = sc8[..., 8:12]
    scale = torch.cat([lo & 63, (tail & 0xF) | ((lo >> 6) << 4)], -1)  # sub-blocks 0..3, 4..7
    mins = torch.cat([hi & 63, (tail >> 4) | ((hi >> 6) << 4)], -1)
    qs = torch.from_numpy(blocks[..., 16:].copy()).to(torch.int32).reshape(n, -1, 4, 32)  # 4 chunks of 64 values
    q = torch.stack([qs & 0xF, qs >> 4], 3)  # chunk c: low nibbles = sub-block 2c, high nibbles = 2c + 1
    sub_d = (d[..., None] * scale.float()).reshape(n, -1)  # (N, K/32)
    sub_m = (-dmin[..., None] * mins.float()).reshape(n, -1)
    return q.reshape(n, k), sub_d, sub_m


def gguf_dequantize(qtype: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """Exact fp32 values of split GGUF blocks (the reference formula of each type)."""
    n, k = q.shape
    qd = q.float().reshape(n, -1, GGUF_BLOCK)
    if qtype == "Q4_0":
        w = d[..., None] * (qd - 8)
    elif qtype in ("Q4_1", "Q4_K"):
        w = d[..., None] * qd + m[..., None]
    else:
        w = d[..., None] * qd
    return w.reshape(n, k)


@dataclass
class QuantReport:
    """What ``quantize_model`` did, per layer kind: how many packed from GGUF blocks, quantized from
    dense weights, or left dense (with the reason)."""

    mode: str
    packed: dict[str, int] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    lora_fused: int = 0  # projections whose gated-LoRA A is packed into the same kernel (as extra rows), B int8

    def add(self, source: str) -> None:
        self.packed[source] = self.packed.get(source, 0) + 1

    def summary(self) -> str:
        parts = [f"{n} from {s}" for s, n in sorted(self.packed.items())]
        if self.dense:
            parts.append(f"{len(self.dense)} left dense ({self.dense[0]}{', ...' if len(self.dense) > 1 else ''})")
        if self.lora_fused:
            parts.append(f"gated LoRA A packed into {self.lora_fused} kernels, B int8")
        return f"quant {self.mode}: " + "; ".join(parts)


_INT8_K_ALIGN = 16  # measured: _weight_int8pack_mm returns garbage (or crashes) for other input dims


def quantizable(kind: str, n: int, k: int, act: str = "bf16") -> str | None:
    """None when a (n, k) weight fits ``kind``'s kernel, else why not."""
    if act == "int8" and k % GROUP:
        return f"input dim {k} is not a multiple of {GROUP} (int8 activations are quantized in groups of {GROUP})"
    if kind == "int4" and k % GROUP:
        return f"input dim {k} is not a multiple of the int4 group {GROUP}"
    if kind == "int8" and k % _INT8_K_ALIGN:
        return f"input dim {k} is not a multiple of {_INT8_K_ALIGN} (the int8 kernel's)"
    return None


# ---- a whole decoder ------------------------------------------------------------------------------

# our fused projection -> its GGUF tensors, in row order (q | k | v and gate | up)
_GGUF_PARTS = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",), "gate_up": ("ffn_gate", "ffn_up"),
               "down": ("ffn_down",)}


def _llama_rows(n: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (as transformers' GGUF loader does)."""
    dim = n // heads // 2
    return torch.arange(n).reshape(heads, dim, 2).transpose(1, 2).reshape(n)


class _GGUFSource:
    """The raw tensors of a GGUF file, by name."""

    def __init__(self, path: str):
        from gguf import GGUFReader

        reader = GGUFReader(path)
        self.tensors = {t.name: t for t in reader.tensors}
        field_ = reader.fields.get("general.architecture")
        self.arch = bytes(field_.parts[field_.data[0]]).decode() if field_ is not None else ""

    def parts(self, layer: int, proj: str, cfg) -> list[tuple[str, np.ndarray, torch.Tensor | None]] | None:
        out = []
        for name in _GGUF_PARTS[proj]:
            t = self.tensors.get(f"blk.{layer}.{name}.weight")
            if t is None:
                return None
            rows = None
            if self.arch == "llama" and name in ("attn_q", "attn_k"):
                rows = _llama_rows(t.data.shape[0], cfg.num_heads if name == "attn_q" else cfg.num_kv_heads)
            out.append((t.tensor_type.name, t.data, rows))
        return out


def _spec_from_parts(parts, k: int, kind: str) -> tuple[tuple, str] | None:
    """Codes for one fused projection from its GGUF tensors, part by part (q | k | v may mix block types),
    and their source. None when a part's type is not read directly (the dense weights are used then)."""
    specs, sources = [], []
    for qtype, data, rows in parts:
        if qtype not in _BLOCK_BYTES:  # any other type (Q5_K, Q6_K, F16, ...): gguf's exact dequantization
            w = _gguf_reference(qtype, data)
            if w is None:
                return None
            specs.append(_dense_spec(w if rows is None else w[rows], kind))
            sources.append(f"gguf {qtype}, re-quantized")
            continue
        q, d, m = gguf_blocks(qtype, data, k)
        if rows is not None:
            q, d, m = q[rows], d[rows], (None if m is None else m[rows])
        if kind == "int4" and qtype in _Q4:
            zero = torch.zeros_like(d) if m is None else m + 8 * d  # kernel: (q − 8) · d + zero
            specs.append(("int4", q, d, zero))
            sources.append(f"gguf {qtype}")
        else:  # exact fp32 values of the blocks, re-quantized for the kernel
            specs.append(_dense_spec(gguf_dequantize(qtype, q, d, m), kind))
            sources.append(f"gguf {qtype}, re-quantized")
    spec = (kind, *(torch.cat(xs) for xs in zip(*(sp[1:] for sp in specs))))
    return spec, " + ".join(dict.fromkeys(sources))


def _gguf_reference(qtype: str, data: np.ndarray) -> torch.Tensor | None:
    """Exact fp32 values of a GGUF tensor of any type gguf can dequantize (None if it cannot)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        return torch.from_numpy(np.asarray(dequantize(data, GGMLQuantizationType[qtype]), dtype=np.float32))
    except (KeyError, NotImplementedError, ValueError):
        return None


def _dense_spec(w: torch.Tensor, kind: str) -> tuple:
    return ("int4", *int4_codes(w)) if kind == "int4" else ("int8", *int8_codes(w))


def _layer_from(parts, w: torch.Tensor, kind: str, bias: torch.Tensor | None = None,
                extra: torch.Tensor | None = None, act: str = "bf16") -> QuantLinear:
    """The quantized layer of weight ``w`` (N, K): from its GGUF tensors ``parts`` when they are this
    weight's (same shape), else from ``w`` itself. ``extra``: rows appended as in ``_pack``."""
    got = _spec_from_parts(parts, w.shape[1], kind) if parts else None
    if got is not None and tuple(got[0][1].shape) != tuple(w.shape):  # not this model's tensor
        got = None
    spec, source = got if got is not None else (_dense_spec(w.detach(), kind), "dense")
    return _pack(spec, bias, source, extra, act)


PROJECTIONS = ("qkv", "o", "gate_up", "down")
# --quant mode -> (weight kind, activations): w4a8 / w8a8 quantize activations to int8 per row and group of 32
WEIGHTS_AND_ACTS = {"int4": ("int4", "bf16"), "int8": ("int8", "bf16"), "w4a8": ("int4", "int8"),
                    "w8a8": ("int8", "int8")}


def quantize_model(model, mode: str, gguf_path: str | None = None, head: str | None = None) -> QuantReport:
    """Replace every decoder projection's matmul (and the output head's) by a quantized kernel, in
    place. ``mode`` int4 / int8; ``gguf_path``: pack the layers straight from this GGUF's blocks
    where their types allow, else quantize the loaded dense weights. ``head`` (default: int8 for
    int4 mode, as GGUF files keep the output head at 8 bits) is the output head's kind.
    Gated LoRA adapters stay on top (``lora.GatedLoRAProj``): A packed as extra output rows of the
    base kernel, scale · B in the int8 kernel (when its rank is a multiple of 16, else dense)."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    report = QuantReport(mode)
    if mode == "none":
        return report
    kind, act = WEIGHTS_AND_ACTS[mode]
    if act == "int8" and not uses_idlm_kernel("int8"):
        raise ValueError(f"--quant {mode} (int8 activations) needs idlm's native kernels "
                         f"({native.why() or 'not available'})")
    src = _GGUFSource(gguf_path) if gguf_path else None
    cfg = model.cfg
    for i, layer in enumerate(model.layers):
        for name in PROJECTIONS:
            proj = getattr(layer, name)
            n, k = proj.out_features, proj.in_features
            why = quantizable(kind, n, k, act)
            if why is not None:
                report.dense.append(f"layers.{i}.{name}: {why}")
                continue
            bias = None if proj.bias is None else proj.bias.detach()
            parts = src.parts(i, name, cfg) if src is not None else None
            lora_a = getattr(proj, "lora_A", None)  # R-ISD: A rides in the same kernel call
            q = _layer_from(parts, proj.weight, kind, bias, None if lora_a is None else lora_a.detach(), act)
            set_quant(proj, q)
            if lora_a is not None:  # and scale · B in the int8 kernel: half the time of a small bf16 matmul here
                b_act = act if quantizable("int8", n, proj.rank, act) is None else "bf16"
                if quantizable("int8", n, proj.rank, b_act) is None:
                    proj.lora_b_quant = int8_from_dense(proj.lora_B.detach().float() * proj.scale, source="lora B",
                                                        act=b_act)
            report.add(q.source)
            report.lora_fused += lora_a is not None
    head_kind = head or "int8"
    w = model.head_weight().detach()
    why = quantizable(head_kind, *w.shape, act)
    if why is not None:
        report.dense.append(f"head: {why}")
    else:
        name = "output.weight" if src is not None and "output.weight" in src.tensors else "token_embd.weight"
        t = src.tensors.get(name) if src is not None else None
        hq = _layer_from(None if t is None else [(t.tensor_type.name, t.data, None)], w, head_kind, act=act)
        hq.source = f"head: {hq.source}"
        model.head_quant = hq
        report.add(hq.source)
        if model.draft_vocab is not None:  # MASK rows' head: the same rows, quantized the same way
            ids = model.draft_vocab
            dq = _layer_from(None if t is None else [(t.tensor_type.name, t.data, ids)], w[ids], head_kind, act=act)
            dq.source = f"draft head ({len(ids)} tokens)"
            model.draft_head_quant = dq
    model.quant_mode = mode
    return report


def auto_quant(gguf_path: str | None, device: str = "cpu") -> str:
    """``--quant auto``: for a GGUF whose projections are all Q4_0 / Q4_1 / Q4_K on the CPU (their codes go
    into the kernel as they are, so nothing is lost beyond the file's own quantization): w4a8 where idlm's
    native kernels run (the fastest: activations in int8 per group of 32, as llama.cpp runs such files),
    else int4 on PyTorch's kernels; otherwise none (dense weights are not quantized unless asked)."""
    if device != "cpu" or gguf_path is None:
        return "none"
    from gguf import GGUFReader

    types = {t.tensor_type.name for t in GGUFReader(gguf_path).tensors
             if t.name.startswith("blk.") and any(f".{p}." in t.name for parts in _GGUF_PARTS.values() for p in parts)}
    if not types or not types <= set(_Q4):
        return "none"
    return "w4a8" if uses_idlm_kernel("int8") else "int4"


def set_quant(proj, q: QuantLinear) -> None:
    """Attach ``q`` to a projection and drop its dense weight (the bias moves into ``q``)."""
    proj.quant = q
    proj.weight = None
    proj.bias = None
