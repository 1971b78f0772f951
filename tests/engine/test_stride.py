"""The load-adaptive window policy: expected tokens (spec §3.8), the calibrated cost, and the
correction it learns from the engine's own step times."""

from __future__ import annotations

import pytest

from idlm.config import DecodeConfig, SamplingParams
from idlm.engine import CostModel, EngineConfig, LLMEngine
from idlm.engine.stride import Correction, expected_tokens

from ..decode.tiny import tiny_model


def test_expected_tokens_by_hand() -> None:
    assert expected_tokens([0.5, 0.5], 1, False) == 1.0
    # fallback: every step verifies; 1 anchor token + E[accepted drafts] = 1 + .8 + .8 * .5
    assert expected_tokens([0.8, 0.5], 3, True) == pytest.approx(2.2)
    # no fallback, N = 2, a = P(all accepted) = .6: (a N + (1 - a)(0 + 2)) / (a + 2(1 - a)) = 2 / 1.4
    assert expected_tokens([0.6], 2, False) == pytest.approx(2.0 / 1.4)
    assert expected_tokens([1.0, 1.0], 3, False) == 3.0


def test_calibration_is_made_monotone() -> None:
    cost = CostModel([1, 8, 16, 32], [0.02, 0.03, 0.025, 0.05])  # a noisy point below its left neighbour
    assert cost.seconds == [0.02, 0.03, 0.03, 0.05]
    assert cost(12) == pytest.approx(0.03)


def test_gated_rows_cost_a_fixed_part_once_any_row_is_gated_plus_a_part_per_row() -> None:
    cost = CostModel([1, 64], [0.010, 0.020], gated_per_row=0.0001, gated_fixed=0.003)
    assert cost(4) == pytest.approx(0.010 + 3 * 0.010 / 63)
    assert cost(4, gated=0) == cost(4)
    assert cost(4, gated=2) == pytest.approx(cost(4) + 0.003 + 0.0002)


def test_calibration_of_an_adapter_model_measures_both_gated_parts_and_caches_them(tmp_path, monkeypatch) -> None:
    from idlm.model.lora import add_lora

    monkeypatch.setenv("IDLM_CACHE", str(tmp_path))
    model = tiny_model(seed=1)
    add_lora(model, rank=4, alpha=8.0)
    model.requires_grad_(False)
    cost = CostModel.for_model(model)  # measured and written to the cache
    assert cost.gated_fixed >= 0 and cost.gated_per_row >= 0
    again = CostModel.for_model(model)  # read back
    assert (again.gated_fixed, again.gated_per_row, again.seconds) == (cost.gated_fixed, cost.gated_per_row,
                                                                       cost.seconds)


def test_correction_learns_each_row_count_and_an_untried_one_takes_the_worst() -> None:
    corr = Correction([1, 16, 64, 128])
    assert corr(40) == 1.0  # nothing observed: the calibration as it is
    for _ in range(30):
        corr.update(16, 2.0)  # steps at 16 rows take twice the calibrated time
        corr.update(1, 1.2)
    assert corr(16) == pytest.approx(2.0, rel=1e-3) and corr(1) == pytest.approx(1.2, rel=1e-3)
    assert corr(128) == pytest.approx(2.0, rel=1e-3)  # never observed: the worst factor seen
    for _ in range(30):
        corr.update(64, 0.5)
    assert corr(64) == pytest.approx(0.5, rel=1e-2) and corr(16) > 1.9
    assert corr(40) == pytest.approx((24 * 0.5 + 24 * corr(16)) / 48, rel=1e-2)  # interpolated


def test_policy_falls_back_to_ar_once_windows_prove_slow() -> None:
    """A calibration that calls every row free makes ``--stride auto`` draft as much as it can; when
    the engine then observes that wide steps are slow, the policy switches those requests to AR."""
    model = tiny_model(seed=3, vocab=8)
    eng = LLMEngine(model, EngineConfig(num_blocks=256, block_size=4, max_running=4),
                    cost=CostModel([1, 4, 16, 64], [0.01, 0.01, 0.01, 0.01]))
    for p in ([1, 2, 3], [4, 5, 6, 7], [2, 2, 1], [6, 1, 0, 3, 2]):
        eng.add_request(p, SamplingParams(max_new_tokens=200, ignore_eos=True), DecodeConfig(stride="auto"))
    for _ in range(6):  # prefill and a few decode steps
        eng.step()
    policy = eng.stride_policy
    policy._correction = None  # forget the tiny model's real step times: the calibration alone
    running = list(eng.scheduler.running)
    first = set(policy.choose(running, 0).values())
    assert len(first) == 1 and all(d >= 1 and fb for d, fb in first)  # rows look free: draft, with fallback
    for _ in range(60):
        policy.observe(4, 0, 0.01)  # four AR rows: as calibrated
        policy.observe(16, 0, 0.05)  # sixteen rows: 5x the calibration
        policy.observe(64, 0, 0.2)
    assert set(policy.choose(running, 0).values()) == {(0, False)}  # N = 1: AR
    # every EXPLORE_EVERY AR choices in a row, one step drafts anyway (so window times get measured again)
    from idlm.engine.stride import EXPLORE_EVERY

    picks = [set(policy.choose(running, 0).values()) for _ in range(2 * EXPLORE_EVERY + 2)]
    drafted = [i for i, p in enumerate(picks) if p != {(0, False)}]
    assert drafted == [EXPLORE_EVERY - 1, 2 * EXPLORE_EVERY], drafted
