"""Frozen, validated configuration dataclasses shared across modules.

Validation errors are ``ConfigError`` (a ValueError) whose message names the offending flag, so the
CLI can print one clear line. Nothing here reads files or touches devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIN_STRIDE, MAX_STRIDE = 2, 8
SAMPLING_MODES = ("exact", "reference")


class ConfigError(ValueError):
    """A user-supplied setting is out of range; the message names the flag."""


def _finite(name: str, v: float) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or math.isinf(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 = greedy (top-k / top-p then have no effect)."""

    temperature: float = 0.0  # --temperature: 0 = greedy; > 0 scales logits by 1/T before sampling
    top_k: int = 0  # --top-k: keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # --top-p: keep the smallest set with cumulative probability >= p (1 = off)
    seed: int | None = None  # --seed: per-request RNG seed (None = nondeterministic)
    max_new_tokens: int = 256  # --max-new-tokens: hard cap on generated tokens
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # extra ids that end generation (kept)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)

    def __post_init__(self) -> None:
        _finite("--temperature", self.temperature)
        _finite("--top-p", self.top_p)
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class DecodeConfig:
    """Which decoder runs and its ISD knobs (spec §3)."""

    mode: str = "isd"  # --mode: isd (introspective strided decoding) or ar (one token per forward)
    stride: int = 3  # --stride: N = tokens a forward can commit (1 anchor + N-1 drafts), 2..8
    pad_windows: bool = False  # --pad-windows: pad every window to its largest size like the GPU reference
    fallback: bool = True  # --fallback/--no-fallback: also draft for each possible rejection, so none costs a cold step
    sampling_mode: str = "exact"  # --sampling-mode: exact (distribution-preserving) or reference (approximate)
    mask_token_id: int | None = None  # MASK input id; None = the model's own

    def __post_init__(self) -> None:
        if self.mode not in ("isd", "ar"):
            raise ConfigError(f"--mode must be 'isd' or 'ar', got {self.mode!r}")
        if not isinstance(self.stride, int) or not MIN_STRIDE <= self.stride <= MAX_STRIDE:
            raise ConfigError(f"--stride must be an integer in {MIN_STRIDE}..{MAX_STRIDE}, got {self.stride!r}")
        if self.sampling_mode not in SAMPLING_MODES:
            raise ConfigError(f"--sampling-mode must be one of {SAMPLING_MODES}, got {self.sampling_mode!r}")

    @property
    def n_drafts(self) -> int:
        return self.stride - 1

    @property
    def window(self) -> int:
        """The largest window: pending + N-1 specs + N-1 MASKs (2N - 1), plus N-1 fallback MASKs for
        each of the N-1 specs that could be rejected when ``fallback`` is on."""
        return 2 * self.stride - 1 + (self.n_drafts ** 2 if self.fallback else 0)
