"""Loss support and normalisation (spec §2.1–2.2), chunked projection, draft accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idlm.train.batch import IGNORE, Sample, collate
from idlm.train.forward import Halves
from idlm.train.loss import LossWeights, chunked_ce, draft_accuracy, idlm_loss


def _setup(tiny_model, block=3):
    rows = [[Sample((1, 2, 3, 4), tuple(range(10, 16))), Sample((7,), (20, 21, 22))]]
    batch = collate(rows, block, tiny_model.cfg.mask_token_id, pad_multiple=4, trim_prompt=False)
    g = torch.Generator().manual_seed(0)
    h = Halves(torch.randn(1, batch.n_noisy, 64, generator=g, requires_grad=True),
               torch.randn(1, batch.clean_targets.shape[1], 64, generator=g, requires_grad=True))
    return batch, h


def _manual_ce(model, hidden, positions, targets):
    logits = model.logits(hidden[0, positions])
    return F.cross_entropy(logits, torch.tensor(targets), reduction="sum")


def test_ce_noisy_support_and_normalisation(tiny_model):
    batch, h = _setup(tiny_model)
    out = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False))
    # sample 1 (P=4, L=10): noisy 4..8 -> x5..x9; sample 2 (P=1, L=4) at offset 10: 11, 12 -> x2, x3
    pos = [4, 5, 6, 7, 8, 11, 12]
    tgt = [11, 12, 13, 14, 15, 21, 22]
    assert torch.nonzero(batch.noisy_targets[0] != IGNORE).flatten().tolist() == pos
    expect = _manual_ce(tiny_model, h.noisy, pos, tgt) / 9  # 6 + 3 response tokens
    torch.testing.assert_close(out.loss, expect)
    assert out.ce_clean is None


def test_ce_clean_support(tiny_model):
    batch, h = _setup(tiny_model)
    out = idlm_loss(tiny_model, h, batch, LossWeights(alpha=0.2))
    pos = [3, 4, 5, 6, 7, 8, 10, 11, 12]  # P-1 .. L-2 of each sample
    tgt = [10, 11, 12, 13, 14, 15, 20, 21, 22]
    assert torch.nonzero(batch.clean_targets[0] != IGNORE).flatten().tolist() == pos
    torch.testing.assert_close(out.ce_clean, _manual_ce(tiny_model, h.clean, pos, tgt).detach() / 9)
    torch.testing.assert_close(out.loss, out.ce_noisy + 0.2 * out.ce_clean)


def test_auto_balance_uses_the_detached_ratio(tiny_model):
    batch, h = _setup(tiny_model)
    out = idlm_loss(tiny_model, h, batch, LossWeights(auto_balance=True))
    torch.testing.assert_close(out.loss.detach(), 2 * out.ce_noisy)
    out.loss.backward()
    g_auto = h.clean.grad.clone()
    h.clean.grad = None
    plain = idlm_loss(tiny_model, h, batch, LossWeights(alpha=1.0))
    plain.loss.backward()
    torch.testing.assert_close(g_auto, h.clean.grad * (out.ce_noisy / out.ce_clean))


def test_chunking_changes_nothing(tiny_model):
    g = torch.Generator().manual_seed(1)
    hid = torch.randn(37, 64, generator=g, requires_grad=True)
    tgt = torch.randint(0, 128, (37,), generator=g)
    a, pa = chunked_ce(tiny_model, hid, tgt, chunk=5)
    (ga,) = torch.autograd.grad(a, hid)
    b, pb = chunked_ce(tiny_model, hid, tgt, chunk=1000)
    (gb,) = torch.autograd.grad(b, hid)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
    assert torch.equal(pa, pb) and torch.equal(pa, tiny_model.logits(hid).argmax(-1))


def test_draft_accuracy_by_offset():
    pred = torch.tensor([1, 2, 3, 4, 5])
    tgt = torch.tensor([1, 0, 3, 4, 0])
    k = torch.tensor([1, 2, 1, 2, 3])
    hits, count = draft_accuracy(pred, tgt, k, block=3)
    assert hits.tolist() == [2, 1, 0] and count.tolist() == [2, 2, 1]


def test_custom_normalisers_for_accumulation(tiny_model):
    batch, h = _setup(tiny_model)
    a = idlm_loss(tiny_model, h, batch, LossWeights(alpha=0.2))
    b = idlm_loss(tiny_model, h, batch, LossWeights(alpha=0.2), noisy_norm=18, clean_norm=18)
    torch.testing.assert_close(b.loss, a.loss / 2)
