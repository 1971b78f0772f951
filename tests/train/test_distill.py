"""Soft targets for the MASK rows (``--objective kl|rkl|tvd|mix``) and acceptance weighting
(``--accept-weighting``): alignment of MASK rows with their teacher rows, the divergences, where
gradients go, that training moves q toward p, the estimator, the CLI, and that ``--objective ce``
is bit-identical to the code before soft targets existed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from idlm.cli import main
from idlm.model.lora import add_lora
from idlm.train import ConvertConfig, run_convert
from idlm.train import loop as loop_mod
from idlm.train.batch import IGNORE, Sample, collate
from idlm.train.distill import (
    acceptance_rates,
    chain_agreement,
    kl_from_logits,
    reach_weights,
    soft_divergence,
    update_acceptance,
)
from idlm.train.forward import Halves, forward_clean_prefix, forward_joint
from idlm.train.loss import LossWeights, NoisyTarget, chunked_ce, idlm_loss, teacher_rows

SOFT_KINDS = ("kl", "rkl", "tvd")


def _rows():
    return [[Sample((1, 2, 3, 4), tuple(range(10, 16))), Sample((7,), (20, 21, 22))]]


def _halves(batch, seed=0, hidden=64):
    g = torch.Generator().manual_seed(seed)
    return Halves(torch.randn(1, batch.n_noisy, hidden, generator=g, requires_grad=True),
                  torch.randn(1, batch.clean_targets.shape[1], hidden, generator=g, requires_grad=True))


def _randomize_lora(model, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _cfg(tiny_folder, toy_data, out, **kw) -> ConvertConfig:
    base = {"data": (str(toy_data),), "out": str(out), "model": str(tiny_folder), "stages": "3:10",
            "lr": 1e-2, "row_tokens": 64, "max_len": 64, "batch_rows": 2, "save_every": 0, "progress": False,
            "lora_rank": 8, "lora_alpha": 16.0, "precision": "fp32", "mode": "lora"}
    return ConvertConfig(**{**base, **kw})


# ---- alignment of MASK rows and teacher rows ------------------------------------------------------

@pytest.mark.parametrize("trim", [True, False])
@pytest.mark.parametrize("block", [1, 2, 3])
def test_clean_index_points_at_the_row_predicting_the_same_token(block, trim):
    rows = [[Sample((1, 2, 3, 4, 5), (10, 11, 12, 13, 14, 15, 16)), Sample((7, 8), (20, 21, 22))],
            [Sample((30,), (31, 32, 33, 34))]]
    batch = collate(rows, block, 128, pad_multiple=8, trim_prompt=trim)
    m = batch.n_noisy
    real = batch.positions[:, :m] >= 0
    for r in range(2):
        idx = batch.clean_index[r]
        pad = idx < 0
        # padding has no teacher; every real noisy slot has the clean slot of the same position
        n_real = sum(len(s) - ((len(s.prompt_ids) // block) * block if trim else 0) for s in rows[r])
        assert pad.tolist() == [i >= n_real for i in range(m)]
        ok = idx[~pad]
        assert torch.equal(batch.positions[r, m + ok], batch.positions[r, :m][~pad])
    sel = batch.noisy_targets != IGNORE
    assert bool(real.all())
    teacher_tgt = batch.clean_targets.gather(1, batch.clean_index.clamp(min=0))
    assert torch.equal(teacher_tgt[sel], batch.noisy_targets[sel])  # same token predicted


def test_teacher_rows_explicitly(tiny_model):
    """trim_prompt, block 3: sample 1 (P=4) keeps noisy positions 3..9 in slots 0..6, sample 2 (P=1)
    positions 0..3 in slots 7..10; the scored MASK slots 1..5, 8, 9 take clean slots 4..8, 11, 12."""
    batch = collate(_rows(), 3, tiny_model.cfg.mask_token_id, pad_multiple=4)
    sel = batch.noisy_targets != IGNORE
    assert torch.nonzero(sel[0]).flatten().tolist() == [1, 2, 3, 4, 5, 8, 9]
    assert batch.clean_index[0][sel[0]].tolist() == [4, 5, 6, 7, 8, 11, 12]
    h = _halves(batch)
    torch.testing.assert_close(teacher_rows(h.clean, batch, sel), h.clean[0, [4, 5, 6, 7, 8, 11, 12]])


def test_lora_teacher_is_the_base_models_next_token_distribution(tiny_model, tiny_folder):
    """In R-ISD the teacher rows are the frozen base's causal logits at the same positions."""
    from idlm.model import load_folder

    base = load_folder(tiny_folder)
    add_lora(tiny_model, rank=4, alpha=8)
    _randomize_lora(tiny_model)
    s = Sample((5, 9, 17, 33), (40, 41, 42, 43, 44, 45, 46))
    batch = collate([[s]], 3, tiny_model.cfg.mask_token_id, pad_multiple=1)
    sel = batch.noisy_targets != IGNORE
    with torch.no_grad():
        halves = forward_clean_prefix(tiny_model, batch)
        p = tiny_model.logits(teacher_rows(halves.clean, batch, sel))
        x = torch.tensor(s.prompt_ids + s.response_ids)
        want = base(x, torch.arange(len(x))).reshape(len(x), -1)  # plain causal forward of the base
    locs = batch.positions[0, : batch.n_noisy][sel[0]]
    torch.testing.assert_close(p, want[locs], atol=2e-5, rtol=0)


# ---- the divergences ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SOFT_KINDS)
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (2.0, 0), (0.7, 5), (1.0, 1)])
def test_divergence_is_zero_iff_q_equals_p(kind, temperature, top_k):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 40, generator=g) * 3
    p[:, 7] = float("-inf")  # an in-vocabulary MASK column, as Decoder.logits writes it
    q = p + torch.randn(6, 40, generator=g)
    q[:, 7] = float("-inf")
    same = soft_divergence(p.clone(), p, kind, temperature, top_k)
    diff = soft_divergence(q, p, kind, temperature, top_k)
    assert same.abs().max() <= 1e-6
    assert bool((diff > 0).all()) and bool(torch.isfinite(diff).all())
    if top_k:  # coarsening never increases a divergence (data processing)
        assert bool((diff <= soft_divergence(q, p, kind, temperature, 0) + 1e-5).all())


def test_divergences_match_their_definitions():
    g = torch.Generator().manual_seed(4)
    q, p = torch.randn(5, 30, generator=g), torch.randn(5, 30, generator=g)
    lq, lp = q.log_softmax(-1), p.log_softmax(-1)
    def kl(a, b):  # KL(b||a) of log-probabilities, PyTorch's definition
        return F.kl_div(a, b, log_target=True, reduction="none").sum(-1)

    torch.testing.assert_close(soft_divergence(q, p, "kl"), kl(lq, lp))
    torch.testing.assert_close(soft_divergence(q, p, "rkl"), kl(lp, lq))
    torch.testing.assert_close(soft_divergence(q, p, "tvd"), 0.5 * (lq.exp() - lp.exp()).abs().sum(-1))
    t = 2.0
    want = kl((q / t).log_softmax(-1), (p / t).log_softmax(-1))
    torch.testing.assert_close(soft_divergence(q, p, "kl", t), want * t * t)
    # top-k: p's 3 most likely tokens + one bucket with the rest of each distribution's mass
    idx = lp.topk(3, -1).indices
    pq = torch.cat([lq.exp().gather(-1, idx), 1 - lq.exp().gather(-1, idx).sum(-1, keepdim=True)], -1)
    pp = torch.cat([lp.exp().gather(-1, idx), 1 - lp.exp().gather(-1, idx).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(soft_divergence(q, p, "kl", 1.0, 3), (pp * (pp.log() - pq.log())).sum(-1))


def test_fast_kl_matches_the_textbook_formula_and_its_gradient():
    g = torch.Generator().manual_seed(8)
    z = (torch.randn(4, 23, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randn(4, 23, generator=g, dtype=torch.float64) * 2
    torch.autograd.gradcheck(lambda t: kl_from_logits(t, y), (z,))
    lq, lp = z.log_softmax(-1), y.log_softmax(-1)
    textbook = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(kl_from_logits(z, y), textbook)
    (ga,) = torch.autograd.grad(kl_from_logits(z, y).sum(), z)
    (gb,) = torch.autograd.grad(textbook.sum(), z)
    torch.testing.assert_close(ga, gb)


def test_kl_under_bf16_autocast_stays_fp32():
    g = torch.Generator().manual_seed(9)
    q, p = torch.randn(6, 300, generator=g) * 4, torch.randn(6, 300, generator=g) * 4
    want = soft_divergence(q, p, "kl")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = soft_divergence(q, p, "kl")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("objective", ["kl", "rkl", "tvd", "mix"])
def test_loss_is_zero_when_mask_rows_equal_their_teacher_rows(tiny_model, objective):
    batch = collate(_rows(), 3, tiny_model.cfg.mask_token_id, pad_multiple=4)
    sel = batch.noisy_targets != IGNORE
    h = _halves(batch)
    target = NoisyTarget(objective, 1.5 if objective == "kl" else 1.0, 4 if objective == "tvd" else 0)
    out = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False), target=target)
    assert out.loss > 1e-3 and out.soft_noisy > 1e-3  # q != p: positive
    with torch.no_grad():  # now every scored MASK row has its teacher's hidden state: q = p
        noisy = h.noisy.detach().clone()
        noisy[sel] = teacher_rows(h.clean, batch, sel)
    same = idlm_loss(tiny_model, Halves(noisy, h.clean), batch, LossWeights(use_clean=False), target=target)
    assert abs(float(same.soft_noisy)) <= 1e-6
    rest = 0.5 * same.ce_noisy if objective == "mix" else 0.0  # mix = 0.5 kl + 0.5 ce
    assert abs(float(same.loss) - float(rest)) <= 1e-6
    assert same.agree_correct.sum() == sel.sum()  # argmax q == argmax p everywhere


def test_kl_loss_equals_the_explicit_sum(tiny_model):
    batch = collate(_rows(), 3, tiny_model.cfg.mask_token_id, pad_multiple=4)
    h = _halves(batch, 5)
    out = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False), target=NoisyTarget("kl"))
    q = tiny_model.logits(h.noisy[0, [1, 2, 3, 4, 5, 8, 9]]).log_softmax(-1)
    p = tiny_model.logits(h.clean[0, [4, 5, 6, 7, 8, 11, 12]]).log_softmax(-1)
    want = (p.exp() * (p - q)).sum() / 9  # 6 + 3 response tokens, the CE normaliser
    torch.testing.assert_close(out.loss, want)
    torch.testing.assert_close(out.soft_noisy, want.detach())


def test_chunking_changes_nothing_for_soft_targets(tiny_model):
    batch = collate(_rows(), 3, tiny_model.cfg.mask_token_id, pad_multiple=4)
    target = NoisyTarget("mix", 2.0, 0, (1.0, 0.5, 0.25))
    res = []
    for chunk in (2, 1024):  # 2: several checkpointed chunks
        h = _halves(batch, 6)
        out = idlm_loss(tiny_model, h, batch, LossWeights(alpha=0.3), chunk=chunk, target=target)
        out.loss.backward()
        res.append((out.loss.detach(), h.noisy.grad, out.soft_noisy, out.ce_noisy))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)


# ---- where the gradients go -----------------------------------------------------------------------

@pytest.mark.parametrize("objective", ["kl", "rkl", "tvd", "mix"])
def test_soft_loss_has_no_gradient_through_the_clean_rows(tiny_model, objective):
    """The teacher p is a constant: without CE_clean the clean half gets no gradient, and the noisy
    half only at scored MASK rows."""
    batch = collate(_rows(), 3, tiny_model.cfg.mask_token_id, pad_multiple=4)
    sel = batch.noisy_targets != IGNORE
    h = _halves(batch, 1)
    out = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False), target=NoisyTarget(objective))
    out.loss.backward()
    assert h.clean.grad is None
    norms = h.noisy.grad[0].norm(dim=-1)
    assert bool((norms[sel[0]] > 0).all()) and bool((norms[~sel[0]] == 0).all())


def test_risd_soft_loss_reaches_only_the_adapter(tiny_model):
    """R-ISD: the KL gradient lands on the adapter parameters only (all of them), never on the base."""
    trainable = add_lora(tiny_model, rank=4, alpha=8)
    _randomize_lora(tiny_model)
    rows = [[Sample((5, 9, 17, 33), tuple(range(40, 51))), Sample((7, 8), (60, 61, 62, 63))]]
    batch = collate(rows, 3, tiny_model.cfg.mask_token_id)
    out = idlm_loss(tiny_model, forward_clean_prefix(tiny_model, batch), batch, LossWeights(use_clean=False),
                    target=NoisyTarget("kl"))
    out.loss.backward()
    ids = {id(p) for p in trainable}
    for name, p in tiny_model.named_parameters():
        if id(p) in ids:
            assert p.grad is not None and p.grad.norm() > 0, name
        else:
            assert p.grad is None, name


def test_full_mode_soft_gradient_equals_a_constant_teacher(tiny_model):
    """Full fine-tuning: the gradient of the KL term through the joint forward equals the gradient
    with the clean half replaced by a precomputed constant (p is detached)."""
    tiny_model.requires_grad_(True)
    rows = [[Sample((5, 9, 17, 33), tuple(range(40, 51)))]]
    batch = collate(rows, 3, tiny_model.cfg.mask_token_id)
    params = [p for p in tiny_model.parameters()]
    h = forward_joint(tiny_model, batch)
    out = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False), target=NoisyTarget("kl"))
    g_joint = torch.autograd.grad(out.loss, params, allow_unused=True)
    h2 = forward_joint(tiny_model, batch)
    const = Halves(h2.noisy, h2.clean.detach().clone())
    out2 = idlm_loss(tiny_model, const, batch, LossWeights(use_clean=False), target=NoisyTarget("kl"))
    g_const = torch.autograd.grad(out2.loss, params, allow_unused=True)
    for a, b in zip(g_joint, g_const):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


# ---- training ---------------------------------------------------------------------------------------

def _kl_on(model, batch) -> float:
    with torch.no_grad():
        out = idlm_loss(model, forward_clean_prefix(model, batch), batch, LossWeights(use_clean=False),
                        target=NoisyTarget("kl"))
    return float(out.soft_noisy)


def test_training_with_kl_moves_q_toward_p(tiny_folder, tmp_path):
    """12 KL steps on two toy samples (one packed row): the KL of the MASK rows from the base's
    distribution on that row drops by more than 10% (2.13 -> 1.68 measured), the clean path stays the base."""
    records = [{"key": "0", "prompt_ids": [101, 15, 77, 9, 52], "response_ids": [*range(5, 22), 2]},
               {"key": "1", "prompt_ids": [64, 3, 90], "response_ids": [*range(40, 53), 2]}]
    data = tmp_path / "two.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    trainer = loop_mod.Trainer(_cfg(tiny_folder, data, tmp_path, objective="kl", stages="3:12"))
    batch = collate(trainer.stream.rows(0, 1), 2, trainer.model.cfg.mask_token_id)
    ids, pos = batch.input_ids[0, batch.n_noisy:], batch.positions[0, batch.n_noisy:]
    off = torch.zeros_like(ids, dtype=torch.float)  # gate off everywhere: the clean path
    with torch.no_grad():
        clean_before = trainer.model(ids, pos, gate=off)
    before = _kl_on(trainer.model, batch)
    res = trainer.run()
    after = _kl_on(trainer.model, batch)
    assert after < 0.9 * before, (before, after)
    with torch.no_grad():  # R-ISD: the clean path is still the base model, bit for bit
        assert torch.equal(clean_before, trainer.model(ids, pos, gate=off))
    logged = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert len(logged) == 12 and all(r["objective"] == "kl" and r["soft_noisy"] > 0 for r in logged)
    assert logged[-1]["soft_noisy"] < logged[0]["soft_noisy"]
    assert [r["loss"] for r in logged] == [r["loss"] for r in res.history]
    assert len(logged[0]["agree"]) == 2 and "reach" not in logged[0]


def test_kill_and_resume_keeps_the_acceptance_estimate(tiny_folder, toy_data, tmp_path, monkeypatch):
    kw = {"stages": "2:3,3:4", "save_every": 3, "objective": "mix", "distill_top_k": 16,
          "accept_weighting": True}
    full = run_convert(_cfg(tiny_folder, toy_data, tmp_path / "a", **kw)).history
    assert full[0]["reach"] == [1.0] and full[3]["reach"][0] == 1.0 and full[3]["reach"][1] < 1.0
    real_step = loop_mod.Trainer.train_step

    def dying_step(self):
        if self.state.step == 5:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_convert(_cfg(tiny_folder, toy_data, tmp_path / "b", **kw))
    monkeypatch.setattr(loop_mod.Trainer, "train_step", real_step)
    resumed = run_convert(_cfg(tiny_folder, toy_data, tmp_path / "b", resume=True, **kw)).history
    assert [r["step"] for r in resumed] == [4, 5, 6, 7]
    for a, b in zip(full[3:], resumed):
        assert a["reach"] == b["reach"] and a["accept_est"] == b["accept_est"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


# ---- acceptance weighting -------------------------------------------------------------------------

def test_chain_agreement_counts_rows_whose_earlier_drafts_agree():
    # two blocks of 3 and one of 2: agree = [T F T | T T F | F T]
    agree = torch.tensor([True, False, True, True, True, False, False, True])
    k = torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])
    acc, reached = chain_agreement(agree, k, block=3)
    assert reached.tolist() == [3, 2, 1]  # offset 3 of block 1 is not reached (offset 2 disagreed)
    assert acc.tolist() == [2, 1, 0]
    empty = chain_agreement(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long), 3)
    assert [t.tolist() for t in empty] == [[0, 0, 0], [0, 0, 0]]


def test_reach_weights_are_products_of_discounted_acceptance_rates():
    assert reach_weights([], [], 3) == (1.0, 1.0, 1.0)  # no evidence: unweighted
    a, r = update_acceptance([], [], [8, 3], [10, 6])
    assert acceptance_rates(a, r, 3) == [0.8, 0.5, 1.0]
    assert reach_weights(a, r, 3) == pytest.approx((1.0, 0.8, 0.4))
    a, r = update_acceptance(a, r, [0, 0, 1], [10, 0, 2], decay=0.5)  # A = 0.5·A + new
    assert a == [4.0, 1.5, 1.0] and r == [15.0, 3.0, 2.0]
    assert reach_weights(a, r, 3) == pytest.approx((1.0, 4 / 15, 4 / 15 * 0.5))


def test_accept_weighting_scales_each_offsets_rows(tiny_model):
    batch = collate(_rows(), 3, tiny_model.cfg.mask_token_id, pad_multiple=4)
    sel = batch.noisy_targets != IGNORE
    h = _halves(batch, 2)
    reach = (1.0, 0.5, 0.25)
    out = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False), target=NoisyTarget("ce", reach=reach))
    logits = tiny_model.logits(h.noisy[sel])
    per_row = F.cross_entropy(logits, batch.noisy_targets[sel], reduction="none")
    w = torch.tensor(reach)[batch.draft_k[sel] - 1]
    torch.testing.assert_close(out.loss, (per_row * w).sum() / 9)
    torch.testing.assert_close(out.ce_noisy, per_row.detach().sum() / 9)  # the statistic stays unweighted
    ones = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False),
                     target=NoisyTarget("ce", reach=(1.0,) * 3))
    plain = idlm_loss(tiny_model, h, batch, LossWeights(use_clean=False))
    torch.testing.assert_close(ones.loss, plain.loss)


# ---- --objective ce is the code that was there before --------------------------------------------

def _old_idlm_loss(model, hidden, batch, weights, noisy_norm=None, clean_norm=None, chunk=1024):
    """Verbatim copy of idlm_loss before soft targets were added (statistics left out; chunked_ce itself is unchanged)."""
    sel = batch.noisy_targets != IGNORE
    tgt = batch.noisy_targets[sel]
    noisy_sum, _ = chunked_ce(model, hidden.noisy[sel], tgt, chunk)
    ce_noisy = noisy_sum / (noisy_norm or max(batch.n_response, 1))
    loss, ce_clean = ce_noisy, None
    if weights.use_clean:
        csel = batch.clean_targets != IGNORE
        clean_sum, _ = chunked_ce(model, hidden.clean[csel], batch.clean_targets[csel], chunk)
        ce_clean = clean_sum / (clean_norm or max(int(csel.sum()), 1))
        w = (ce_noisy.detach() / (ce_clean.detach() + 1e-8) if weights.auto_balance else weights.alpha)
        loss = ce_noisy + w * ce_clean
        ce_clean = ce_clean.detach()
    return loss, ce_noisy.detach(), ce_clean


@pytest.mark.parametrize("mode", ["lora", "full"])
@pytest.mark.parametrize("auto", [False, True])
def test_objective_ce_is_bit_identical_to_the_old_loss(tiny_model, mode, auto):
    torch.manual_seed(0)
    if mode == "lora":
        add_lora(tiny_model, rank=4, alpha=8)
        _randomize_lora(tiny_model, 1, 0.1)
    else:
        tiny_model.requires_grad_(True)
    params = [p for p in tiny_model.parameters() if p.requires_grad]
    rows = [[Sample((5, 9, 17, 33), tuple(range(40, 60))), Sample((7, 8), (60, 61, 62, 63))],
            [Sample((3, 4, 5, 6, 7), tuple(range(70, 90)))]]
    batch = collate(rows, 3, tiny_model.cfg.mask_token_id)
    fwd = forward_clean_prefix if mode == "lora" else forward_joint
    weights = LossWeights(0.2, auto, use_clean=mode == "full")
    results = []
    for new in (True, False):
        h = fwd(tiny_model, batch)
        if new:
            out = idlm_loss(tiny_model, h, batch, weights, 50.0, 40.0, chunk=7, target=NoisyTarget("ce"))
            loss, ce_noisy, ce_clean = out.loss, out.ce_noisy, out.ce_clean
        else:
            loss, ce_noisy, ce_clean = _old_idlm_loss(tiny_model, h, batch, weights, 50.0, 40.0, chunk=7)
        grads = torch.autograd.grad(loss, params)
        results.append((loss.detach(), ce_noisy, ce_clean, grads))
    (la, na, ca, ga), (lb, nb, cb, gb) = results
    assert torch.equal(la, lb) and torch.equal(na, nb)
    assert (ca is None and cb is None) or torch.equal(ca, cb)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


# ---- the command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--objective", "js"], "--objective must be one of ce, kl, rkl, tvd, mix, got 'js'"),
    (["--objective", "kl", "--distill-temperature", "0"], "--distill-temperature must be > 0"),
    (["--objective", "kl", "--distill-top-k", "-1"], "--distill-top-k must be >= 0"),
    (["--distill-top-k", "50"], "need a soft --objective"),
])
def test_cli_rejects_bad_distillation_flags(extra, message, capsys):
    assert main(["convert", "--data", "x.jsonl", "--out", "o", *extra]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("idlm: error:") and message in lines[0]
    assert "Traceback" not in err


def test_cli_help_lists_the_new_flags(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--objective", "--distill-temperature", "--distill-top-k", "--accept-weighting",
                 "--no-accept-weighting"):
        assert flag in out
    assert "KL(p||q)" in out
