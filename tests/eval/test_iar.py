"""IAR (spec §6.1): the metric on hand-built cases, exactly 1.0 for AR re-scoring its own output,
anchor tokens exactly 1.0 under parallel decoding, and the bidirectional-block decode window equal
to the bidirectional training forward (training–inference alignment)."""

from __future__ import annotations

import pytest
import torch

from idlm.decode.draft_only import parallel_decode, window_mask
from idlm.eval.iar import IARResult, Sequence, iar_of, measure_iar
from idlm.model import load_folder
from idlm.model.lora import add_lora
from idlm.train.batch import Sample, collate
from idlm.train.forward import forward_joint

from ..train.conftest import make_tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny_iar"), seed=4)


def _lora_model(folder, dtype=torch.float32, seed=0):
    model = load_folder(folder, dtype)
    add_lora(model, rank=4, alpha=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    return model.eval()


def test_hand_case():
    p = torch.tensor([0.5, 0.2, 0.9, 0.1])
    q = torch.tensor([0.25, 0.4, 0.9, 0.4])
    assert iar_of(p, q) == pytest.approx((1.0 + 0.5 + 1.0 + 0.25) / 4)
    s = Sequence([1], tokens=[5, 6, 7, 8], q=q.tolist(), p=p.tolist(), agree=[True, False, True, False],
                 position=[0, 1, 0, 1])
    r = IARResult(1, "causal", [s])
    assert r.iar == pytest.approx(0.6875)
    assert r.per_position() == pytest.approx([1.0, 0.375])
    assert r.draft_iar == pytest.approx(0.375)
    assert r.agreement() == 0.5 and r.agreement(0) == 1.0 and r.agreement(1) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ar_rescoring_its_own_output_is_exactly_one(folder, dtype):
    model = _lora_model(folder, dtype)
    prompts = [[3, 17, 40, 9], [5, 6], [90, 91, 92, 93, 94, 95, 96]]
    res = measure_iar(model, prompts, block=0, max_new_tokens=40)
    assert res.iar == 1.0  # exactly: p and q come from identical rows
    assert all(s.p == s.q for s in res.sequences)
    assert res.agreement() == 1.0 and sum(len(s.tokens) for s in res.sequences) == 120


@pytest.mark.parametrize("attention", ["causal", "bidirectional-block"])
def test_parallel_decode_anchor_tokens_are_exactly_one(folder, attention):
    model = _lora_model(folder, seed=1)
    res = measure_iar(model, [[3, 17, 40, 9], [7, 8, 9]], block=2, max_new_tokens=30, attention=attention)
    per = res.per_position()
    assert per[0] == 1.0  # the anchor row is the causal pass itself
    assert per[1] < 1.0 and per[2] < 1.0  # random drafts disagree with the anchor
    assert {j for s in res.sequences for j in s.position} == {0, 1, 2}
    assert 0 < res.iar < 1


def test_window_mask():
    c = window_mask(2, 3)
    b = window_mask(2, 3, "bidirectional-block")
    assert torch.equal(c, torch.ones(5, 5, dtype=torch.bool).tril())
    assert torch.equal(b[:2], c[:2]) and b[2:].all()
    with pytest.raises(ValueError):
        window_mask(1, 1, "full")


@pytest.mark.parametrize("attention", ["causal", "bidirectional-block"])
def test_decode_window_matches_training_forward(folder, attention):
    """A MASK block whose training block starts right after the clean context gives the same logits
    in the decode window (window_mask) as in a training forward with the same attention. (Blocks
    that straddle the prompt differ under bidirectional-block by construction: there the noisy
    prompt tokens see the MASKs, while decoding never lets clean rows see MASKs.)"""
    model = _lora_model(folder, seed=2)
    block, plen = 3, 6
    ids = [int(x) for x in torch.randint(3, 120, (plen + 9,), generator=torch.Generator().manual_seed(0))]
    s = Sample(tuple(ids[:plen]), tuple(ids[plen:]))
    batch = collate([[s]], block, model.cfg.mask_token_id, pad_multiple=1, trim_prompt=False, attention=attention)
    with torch.no_grad():
        noisy = model.logits(forward_joint(model, batch).noisy[0])
        for first in (6, 9, 12):  # block-aligned starts after the prompt
            cache = model.new_cache(1, 64)
            model.hidden(torch.tensor(ids[:first - 1]), torch.arange(first - 1), cache)
            win = torch.tensor([ids[first - 1]] + [model.cfg.mask_token_id] * block)
            h = model.hidden(win, torch.arange(first - 1, first + block), cache,
                             gate=torch.tensor([0.0] + [1.0] * block), window_mask=window_mask(1, block, attention))
            got = model.logits(h[0, 1:])
            torch.testing.assert_close(got, noisy[first:first + block], atol=2e-5, rtol=0)


def test_decode_respects_eos_and_budget(folder):
    model = _lora_model(folder, seed=3)
    s = parallel_decode(model, [3, 4, 5], block=2, max_new_tokens=7)
    assert len(s.tokens) == 7 and s.position[:3] == [0, 1, 2]
    eos = s.tokens[4]
    s2 = parallel_decode(model, [3, 4, 5], block=2, max_new_tokens=7, eos=(eos,))
    assert s2.tokens == s.tokens[: s.tokens.index(eos) + 1]


@pytest.mark.parametrize("attention", ["causal", "bidirectional-block"])
def test_denoising_steps(folder, attention):
    model = _lora_model(folder, seed=5)
    one = parallel_decode(model, [3, 4, 5], block=2, max_new_tokens=12, attention=attention)
    assert parallel_decode(model, [3, 4, 5], block=2, max_new_tokens=12, attention=attention, steps=1) == one
    res = measure_iar(model, [[3, 4, 5], [9, 8]], block=2, max_new_tokens=12, attention=attention, steps=3)
    assert res.per_position()[0] == 1.0  # the anchor row never sees the block: its q is p in every step
    assert res.steps == 3 and all(len(s.tokens) == 12 for s in res.sequences)
    with pytest.raises(ValueError, match="steps"):
        parallel_decode(model, [3], block=2, max_new_tokens=4, steps=4)


def test_first_denoising_step_commits_the_most_confident(folder):
    """With steps = B + 1 each forward commits exactly one token, the most confident unknown one; the
    first forward is the steps = 1 forward, so its most confident prediction is kept in both."""
    model = _lora_model(folder, seed=6)
    one = parallel_decode(model, [3, 4, 5], block=2, max_new_tokens=3)
    den = parallel_decode(model, [3, 4, 5], block=2, max_new_tokens=3, steps=3)
    best = max(range(3), key=lambda j: one.q[j])
    assert den.tokens[best] == one.tokens[best] and den.q[best] == one.q[best]
