"""Hand-written logits force accept-all / reject-all / reject-at-j; exact expected tokens (spec §3.5-3.6)."""

from __future__ import annotations

import torch

from idlm.config import SamplingParams
from idlm.decode import ISDState, StepSettings, WindowLogits, isd_step, verify_greedy, verify_sampled

V = 10
GREEDY = SamplingParams(temperature=0.0)


def onehot_rows(tokens: list[int], scale: float = 5.0) -> torch.Tensor:
    out = torch.zeros(len(tokens), V)
    out[torch.arange(len(tokens)), torch.tensor(tokens)] = scale
    return out


def window_logits(anchor: list[int], clean: int, drafts: list[int]) -> torch.Tensor:
    """Rows: anchors for each spec, then the clean slot, then the MASK slots."""
    return onehot_rows(anchor + [clean] + drafts)


def test_greedy_accept_all_emits_specs_then_clean() -> None:
    state = ISDState(pending=1, specs=[2, 3, 4])
    step = isd_step(WindowLogits(window_logits([2, 3, 4], clean=5, drafts=[6, 7, 8])), state, StepSettings(3, GREEDY))
    assert step.emitted == [2, 3, 4, 5]
    assert step.kept == 4  # pending + 3 specs
    assert step.verdict.accepted == 3 and step.verdict.correction is None
    assert step.next_state.pending == 5 and step.next_state.specs == [6, 7, 8]


def test_greedy_reject_first_emits_correction_only() -> None:
    state = ISDState(pending=1, specs=[2, 3, 4])
    step = isd_step(WindowLogits(window_logits([9, 3, 4], clean=5, drafts=[6, 7, 8])), state, StepSettings(3, GREEDY))
    assert step.emitted == [9]
    assert step.kept == 1
    assert step.next_state.pending == 9 and step.next_state.specs == []  # forced cold step next


def test_greedy_reject_at_j() -> None:
    for j in range(3):
        anchor = [2, 3, 4]
        anchor[j] = 0
        step = isd_step(WindowLogits(window_logits(anchor, clean=5, drafts=[6, 7, 8])), ISDState(1, [2, 3, 4]),
                        StepSettings(3, GREEDY))
        assert step.emitted == [2, 3, 4][:j] + [0]
        assert step.kept == 1 + j
        assert step.verdict.accepted == j and step.verdict.correction == 0
        assert step.next_state.specs == []  # this step's clean token and drafts are discarded


def test_cold_step_emits_clean_and_proposes() -> None:
    step = isd_step(WindowLogits(onehot_rows([5, 6, 7])), ISDState(pending=4), StepSettings(2, GREEDY))
    assert step.emitted == [5] and step.kept == 1
    assert step.next_state.specs == [6, 7]


def test_verify_greedy_counts() -> None:
    assert verify_greedy(onehot_rows([1, 2]), [1, 2]).accepted == 2
    assert verify_greedy(onehot_rows([1, 2]), [1, 3]).correction == 2
    assert verify_greedy(torch.zeros(0, V), []).accepted == 0


def test_sampled_rule_forced_outcomes() -> None:
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    v = verify_sampled(p, q, [1, 0], g)  # first: p/q = 1 -> accept; second: p = 0 -> reject
    assert v.accepted == 1 and v.correction == 2  # residual max(0, p - q) is all on token 2
