"""Per-request decoding counters (``DecodeStats``): the draft-verification counters (``VerifyCounters``)
plus forwards, tokens, preemptions and time. Counters only; every rate is a property computed at read
time."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .verify import VerifyCounters


@dataclass
class DecodeStats(VerifyCounters):
    stride: int = 1  # N (1 for AR)
    forwards: int = 0  # model forwards, prefill included
    tokens: int = 0  # tokens emitted to the user
    prompt_tokens: int = 0
    preemptions: int = 0  # times the engine freed this request's KV to make room (recomputed later)
    seconds: float = 0.0  # wall time of the decode (prefill included)

    def __post_init__(self) -> None:
        """Per-position counters sized to the request's N-1 draft positions."""
        n = max(self.stride - 1, 0)
        for name in ("proposed_at", "tested_at", "accepted_at"):
            if not getattr(self, name):
                setattr(self, name, [0] * n)

    @property
    def tpf(self) -> float:
        """Tokens per forward."""
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tpf=round(self.tpf, 4), tokens_per_s=round(self.tokens_per_s, 3),
                 acceptance_at=[round(x, 4) for x in self.acceptance_at], mean_accepted=round(self.mean_accepted, 4))
        return d
