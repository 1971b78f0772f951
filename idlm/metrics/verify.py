"""Draft-verification counters: one definition (``VerifyCounters``) behind a request's
``DecodeStats`` and the engine-wide ``EngineMetrics``. A decode step's outcome is one ``VerifyStep``
value (``idlm.decode``'s ``StepResult.verified``); each set of counters records that same value."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class VerifyStep:
    """What one decode step verified."""

    n_specs: int  # drafts checked left to right (0: a cold step, nothing to check)
    accepted: int  # leading drafts accepted
    tree_branches: int = 0  # draft-tree branches the window carried
    tree_hit: bool = False  # the next drafts came from a tree branch (its alternative was the correction)


@dataclass
class VerifyCounters:
    """Counters of verified drafts, per draft position where it matters; rates at read time."""

    verify_steps: int = 0  # steps that checked at least one draft
    cold_steps: int = 0  # steps with no draft to check (after a rejection)
    all_accept_steps: int = 0  # verify steps where every draft was accepted
    rejects: int = 0  # verify steps that rejected a draft
    proposed_at: list[int] = field(default_factory=list)  # [j]: drafts at position j in a verified window
    tested_at: list[int] = field(default_factory=list)  # [j]: drafts at position j that were checked
    accepted_at: list[int] = field(default_factory=list)  # [j]: drafts at position j that were accepted
    tree_branches: int = 0  # draft-tree branches in verified windows
    tree_hits: int = 0  # steps whose next drafts came from a tree branch

    def record(self, step: VerifyStep) -> None:
        """Count one step that checked ``step.n_specs`` drafts left to right and accepted ``step.accepted``."""
        self.tree_branches += step.tree_branches
        self.tree_hits += int(step.tree_hit)
        if step.n_specs == 0:
            self.cold_steps += 1
            return
        self.verify_steps += 1
        for j in range(step.n_specs):
            self.proposed_at[j] += 1
        for j in range(min(step.n_specs, step.accepted + 1)):
            self.tested_at[j] += 1
        for j in range(step.accepted):
            self.accepted_at[j] += 1
        if step.accepted == step.n_specs:
            self.all_accept_steps += 1
        else:
            self.rejects += 1

    @property
    def acceptance_at(self) -> list[float]:
        """P(draft j accepted | draft j checked), per draft position."""
        return [a / t if t else 0.0 for a, t in zip(self.accepted_at, self.tested_at)]

    @property
    def mean_accepted(self) -> float:
        """Mean accepted drafts per verify step."""
        return sum(self.accepted_at) / self.verify_steps if self.verify_steps else 0.0
