"""Per-request decoding counters (``DecodeStats``). Counters only; every rate is a property computed
at read time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    stride: int = 1  # N (1 for AR)
    forwards: int = 0  # model forwards, prefill included
    tokens: int = 0  # tokens emitted to the user
    prompt_tokens: int = 0
    verify_steps: int = 0  # steps that checked at least one draft
    cold_steps: int = 0  # steps with no draft to check (after a rejection)
    all_accept_steps: int = 0  # verify steps where every draft was accepted
    rejects: int = 0  # verify steps that rejected a draft
    proposed_at: list[int] = field(default_factory=list)  # [j]: drafts at position j in a verified window
    tested_at: list[int] = field(default_factory=list)  # [j]: drafts at position j that were checked
    accepted_at: list[int] = field(default_factory=list)  # [j]: drafts at position j that were accepted
    preemptions: int = 0  # times the engine freed this request's KV to make room (recomputed later)
    tree_branches: int = 0  # draft-tree branches in verified windows
    tree_hits: int = 0  # steps whose next drafts came from a tree branch (its alternative was the correction)
    seconds: float = 0.0  # wall time of the decode (prefill included)

    def __post_init__(self) -> None:
        n = max(self.stride - 1, 0)
        for name in ("proposed_at", "tested_at", "accepted_at"):
            if not getattr(self, name):
                setattr(self, name, [0] * n)

    def record_verify(self, n_specs: int, n_accepted: int) -> None:
        """One step that checked ``n_specs`` drafts left to right and accepted ``n_accepted``."""
        if n_specs == 0:
            self.cold_steps += 1
            return
        self.verify_steps += 1
        for j in range(n_specs):
            self.proposed_at[j] += 1
        tested = min(n_specs, n_accepted + 1)
        for j in range(tested):
            self.tested_at[j] += 1
        for j in range(n_accepted):
            self.accepted_at[j] += 1
        if n_accepted == n_specs:
            self.all_accept_steps += 1
        else:
            self.rejects += 1

    def record_tree(self, branches: int, hit: bool) -> None:
        self.tree_branches += branches
        self.tree_hits += int(hit)

    @property
    def tpf(self) -> float:
        """Tokens per forward."""
        return self.tokens / self.forwards if self.forwards else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_at(self) -> list[float]:
        """P(draft j accepted | draft j checked), per draft position."""
        return [a / t if t else 0.0 for a, t in zip(self.accepted_at, self.tested_at)]

    @property
    def mean_accepted(self) -> float:
        """Mean accepted drafts per verify step."""
        return sum(self.accepted_at) / self.verify_steps if self.verify_steps else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tpf=round(self.tpf, 4), tokens_per_s=round(self.tokens_per_s, 3),
                 acceptance_at=[round(x, 4) for x in self.acceptance_at], mean_accepted=round(self.mean_accepted, 4))
        return d
