"""Rotary position embeddings: inverse frequencies for default / linear / llama3 / yarn scaling,
and a cos/sin table indexed by explicit positions."""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Return (inverse frequencies (head_dim/2,), attention scale applied to cos/sin)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv, 1.0
    kind = s["rope_type"]
    if kind == "linear":
        return inv / float(s["factor"]), 1.0
    if kind == "llama3":
        return _llama3(inv, s, cfg.max_position_embeddings), 1.0
    return _yarn(cfg, s)


def _llama3(inv: torch.Tensor, s: dict, max_positions: int) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    orig = float(s.get("original_max_position_embeddings") or max_positions)  # HF's default
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(cfg: ModelConfig, s: dict) -> tuple[torch.Tensor, float]:
    dim, base = cfg.head_dim, cfg.rope_theta
    orig = s.get("original_max_position_embeddings") or cfg.max_position_embeddings
    factor = s.get("factor") or cfg.max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    att = s.get("attention_factor")
    if att is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        att = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return inter * (1 - extra_factor) + extra * extra_factor, float(att)


class RotaryTable:
    """cos/sin rows for positions 0..n-1, grown on demand (fp32, cast at use)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq, self.scale = inv_freq_and_scale(cfg)
        self.cos = self.sin = torch.empty(0)
        self._cast: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 256)
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # (n, head_dim)
        self.cos, self.sin = emb.cos() * self.scale, emb.sin() * self.scale
        self._cast.clear()

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape positions.shape + (head_dim,) in ``dtype``."""
        need = int(positions.max()) + 1 if positions.numel() else 0
        if need > self.cos.shape[0]:
            self._grow(need)
        key = (dtype, positions.device)
        if key not in self._cast:
            self._cast[key] = (self.cos.to(positions.device, dtype), self.sin.to(positions.device, dtype))
        cos, sin = self._cast[key]
        return cos[positions], sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin: (B, 1, T, D). Rotate-half convention (HF Llama/Qwen)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin
