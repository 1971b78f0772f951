"""A draft vocabulary (``--draft-vocab``): MASK rows score only the K ranked tokens, every other row the
whole vocabulary; the drafts change, the output never does."""

from __future__ import annotations

import json

import pytest
import torch

from idlm.config import DecodeConfig, SamplingParams
from idlm.decode import StepSettings, WindowLogits, ar_generate, isd_generate, isd_step, target_probs
from idlm.decode.isd import propose
from idlm.engine import EngineConfig, LLMEngine
from idlm.model import draftvocab
from idlm.model.lora import add_lora
from idlm.model.quant import quantize_model

from ..decode.test_sampling_exact import ANCHOR, CRIT_DF5_1E6, TRIALS, chi_square
from ..decode.tiny import tiny_model
from .test_window_exact import _shaped_like_smollm2


@pytest.mark.parametrize(("dtype", "quant"), [(torch.float32, "none"), (torch.bfloat16, "none"),
                                              (torch.bfloat16, "w4a8"), (torch.bfloat16, "int8")],
                         ids=["fp32", "bf16", "bf16-w4a8", "bf16-int8"])
@torch.inference_mode()
def test_draft_rows_score_only_the_draft_vocabulary_and_equal_the_full_head_there(dtype, quant) -> None:
    model = _shaped_like_smollm2(dtype)
    ids = torch.tensor([3, 7, 100, 101, 250, 511])
    model.set_draft_vocab(ids)
    if quant != "none":
        quantize_model(model, quant)
        assert model.draft_head_quant is not None
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, model.cfg.hidden_size, generator=g).to(dtype)
    drafts = torch.tensor([0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    full = model.logits(h)
    mixed = model.logits(h, drafts)
    assert torch.equal(mixed[~drafts], full[~drafts])  # clean rows: the whole head, bit for bit
    assert torch.equal(mixed[drafts][:, ids], full[drafts][:, ids])  # draft rows: the same numbers on the K tokens
    others = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
    others[ids] = False
    assert torch.isinf(mixed[drafts][:, others]).all()


def test_setting_a_draft_vocabulary_checks_its_ids_and_the_order() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="must be in 0..95"):
        model.set_draft_vocab([1, 96])
    quantize_model(model.to(torch.bfloat16), "int8")
    with pytest.raises(ValueError, match="before quantizing"):
        model.set_draft_vocab([1, 2])


def test_isd_with_a_draft_vocabulary_equals_ar() -> None:
    model = tiny_model(seed=2)
    add_lora(model, rank=4, alpha=8.0)
    model.requires_grad_(False)
    model.set_draft_vocab(list(range(0, 96, 2)))  # half the tokens: many right drafts become impossible
    params = SamplingParams(max_new_tokens=30)
    prompts = [torch.randint(0, 90, (5 + i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(4)]
    refs = [ar_generate(model, p, params).tokens for p in prompts]
    for stride in (2, 3, 4):
        for p, ref in zip(prompts, refs):
            assert isd_generate(model, p, DecodeConfig(stride=stride), params).tokens == ref
    eng = LLMEngine(model, EngineConfig(num_blocks=64, block_size=16, max_running=4))
    outs = eng.generate(prompts, params, DecodeConfig(stride=3))
    assert [o.token_ids for o in outs] == refs


def test_sampled_drafts_outside_the_draft_vocabulary_keep_sampling_exact() -> None:
    """q is zero outside the draft vocabulary (here the anchor's most likely token among them): the p/q test
    and the residual still give every emitted token the anchor's distribution (chi-square, as in
    tests/decode/test_sampling_exact.py)."""
    params = SamplingParams(temperature=0.8)
    draft = torch.tensor([float("-inf"), 2.2, 0.1, 0.9, float("-inf"), 0.5])
    g = torch.Generator().manual_seed(1234)
    counts = torch.zeros(6)
    for _ in range(TRIALS):
        state = propose(draft[None], params, "exact", g)
        assert state.specs[0] not in (0, 4)
        step = isd_step(WindowLogits(torch.cat([ANCHOR[None], ANCHOR[None], draft[None]])), state,
                        StepSettings(1, params, "exact", g))
        counts[step.emitted[0]] += 1
    assert chi_square(counts, target_probs(ANCHOR, params)) < CRIT_DF5_1E6


def test_ranking_file_round_trip_and_choice(tmp_path) -> None:
    counts = draftvocab.count_tokens([[5, 5, 9, 1], [9, 5, 2]])
    meta = draftvocab.write_ranking(tmp_path / draftvocab.FILE, counts, 2, ["a.jsonl"])
    assert meta["ranking"] == [5, 9, 1, 2] and meta["coverage_at_default_k"] == round(5 / 7, 4)
    filled = draftvocab.write_ranking(tmp_path / "all.json", counts, 2, ["a.jsonl"], vocab_size=8)
    assert filled["ranking"] == [5, 9, 1, 2, 0, 3, 4, 6, 7] and filled["distinct"] == 4  # then unseen ids in order
    got = draftvocab.read_ranking(tmp_path)
    assert draftvocab.choose(got, "auto", tmp_path) == [5, 9]
    assert draftvocab.choose(got, 3, tmp_path) == [5, 9, 1]
    assert draftvocab.choose(got, "full", tmp_path) is None
    assert draftvocab.choose(None, "auto", tmp_path) is None
    with pytest.raises(ValueError, match="has no draft_vocab.json"):
        draftvocab.choose(None, 3, tmp_path)
    (tmp_path / draftvocab.FILE).write_text(json.dumps({"ranking": 3}))
    with pytest.raises(ValueError, match="not a draft vocabulary file"):
        draftvocab.read_ranking(tmp_path)
