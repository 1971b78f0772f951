"""ISD driver: KV invariants, stop handling inside accepted runs, and greedy ISD == greedy AR."""

from __future__ import annotations

import itertools

import pytest
import torch

from idlm.config import DecodeConfig, SamplingParams
from idlm.decode import ar_generate, isd_generate

from .tiny import OracleLM, tiny_model, tiny_risd_pair

SEQ = list(range(1, 41))  # the oracle's text: 1, 2, ..., 40
PROMPT = SEQ[:5]


def test_oracle_all_accept_reaches_tpf_n() -> None:
    lm = OracleLM(SEQ)
    n = 4
    out = isd_generate(lm, PROMPT, DecodeConfig(stride=n), SamplingParams(max_new_tokens=25))
    assert out.tokens == SEQ[5:30]
    s = out.stats
    assert s.rejects == 0 and s.cold_steps == 1  # the first step after prefill is a cold step
    # prefill emits 1 token, the cold step 1, every later forward N: 2 + 4 * 6 = 26 >= 25 in 8 forwards
    assert s.forwards == 8 and s.tokens == 25
    assert s.acceptance_at == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("fallback", [False, True])
def test_oracle_rejections_follow_the_commit_table(fallback: bool) -> None:
    # MASK at position 9 predicts a wrong token for position 10.
    lm = OracleLM(SEQ, wrong={9})
    trace = []
    out = isd_generate(lm, PROMPT, DecodeConfig(stride=3, fallback=fallback), SamplingParams(max_new_tokens=20),
                       on_step=lambda c, toks, st: trace.append((c.length, len(toks), list(c.tokens))))
    assert out.tokens == SEQ[5:25]  # still the greedy text of the anchor
    assert out.stats.rejects >= 1
    # without fallback drafts every rejection is followed by a cold step; with them only the first
    # step after prefill is cold
    assert out.stats.cold_steps == (1 if fallback else out.stats.rejects + 1)
    for length, emitted, slots in trace:
        assert length == len(PROMPT) + emitted - 1  # committed = prompt + emitted - 1
        assert lm.cfg.mask_token_id not in slots  # no MASK KV survives a step
        assert slots == SEQ[:length]  # the cache holds exactly the committed text


@pytest.mark.parametrize("n", [2, 3, 5])
def test_stop_token_inside_accepted_run_truncates(n: int) -> None:
    seq = SEQ[:12] + [49] + SEQ[12:]  # EOS (49) right after token 12
    out = isd_generate(OracleLM(seq), PROMPT, DecodeConfig(stride=n), SamplingParams(max_new_tokens=30))
    assert out.tokens == seq[5:13] and out.tokens[-1] == 49
    assert out.finish_reason == "stop"


@pytest.mark.parametrize("n", [2, 4, 8])
def test_max_new_tokens_exact_inside_accepted_run(n: int) -> None:
    for m in (1, 2, 3, 7, 10):
        out = isd_generate(OracleLM(SEQ), PROMPT, DecodeConfig(stride=n), SamplingParams(max_new_tokens=m))
        assert out.tokens == SEQ[5:5 + m] and out.finish_reason == "length"


def test_stop_token_ids_and_ignore_eos() -> None:
    out = isd_generate(OracleLM(SEQ), PROMPT, DecodeConfig(stride=3),
                       SamplingParams(max_new_tokens=30, stop_token_ids=(9,)))
    assert out.tokens == [6, 7, 8, 9] and out.finish_reason == "stop"
    seq = SEQ[:8] + [49] + SEQ[8:]
    out = isd_generate(OracleLM(seq), PROMPT, DecodeConfig(stride=3), SamplingParams(max_new_tokens=6,
                                                                                      ignore_eos=True))
    assert out.tokens == seq[5:11]


def test_padding_changes_nothing_but_work() -> None:
    a = isd_generate(OracleLM(SEQ, wrong={8, 13}), PROMPT, DecodeConfig(stride=4), SamplingParams(max_new_tokens=20))
    b = isd_generate(OracleLM(SEQ, wrong={8, 13}), PROMPT, DecodeConfig(stride=4, pad_windows=True),
                     SamplingParams(max_new_tokens=20))
    assert a.tokens == b.tokens and a.stats.forwards == b.stats.forwards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_greedy_isd_equals_greedy_ar_tiny(family: str, n: int, dtype: torch.dtype) -> None:
    model = tiny_model(seed=n, family=family).to(dtype)
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    for prompt in ([3, 17, 5, 9], [11, 2, 40, 41, 7, 60, 1]):
        ar = ar_generate(model, prompt, params)
        isd = isd_generate(model, prompt, DecodeConfig(stride=n), params)
        assert isd.tokens == ar.tokens
        assert ar.stats.forwards == 48 and isd.stats.tokens == 48


def test_kv_cache_holds_exactly_the_committed_text_real_model() -> None:
    """After every step the cache equals a fresh prefill of prompt + emitted[:-1] (so no MASK KV)."""
    model = tiny_model(seed=7)
    prompt = [5, 6, 7, 8]
    checks = []

    def hook(cache, tokens, state) -> None:
        n = cache.length
        assert n == len(prompt) + len(tokens) - 1
        ref = model.new_cache(capacity=n + 1)
        text = prompt + tokens[:-1]
        model.hidden(torch.tensor(text), torch.arange(n), ref)
        torch.testing.assert_close(cache.k[..., :n, :], ref.k[..., :n, :], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cache.v[..., :n, :], ref.v[..., :n, :], rtol=1e-4, atol=1e-5)
        checks.append(n)

    isd_generate(model, prompt, DecodeConfig(stride=3), SamplingParams(max_new_tokens=20, ignore_eos=True),
                 on_step=hook)
    assert len(checks) >= 7  # prefill + at least 6 more steps were checked


def test_seeded_sampling_is_reproducible_and_seed_sensitive() -> None:
    model = tiny_model(seed=3)
    cfg = DecodeConfig(stride=3)
    p1 = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=123, max_new_tokens=30, ignore_eos=True)
    a, b = isd_generate(model, [1, 2, 3], cfg, p1), isd_generate(model, [1, 2, 3], cfg, p1)
    assert a.tokens == b.tokens
    c = isd_generate(model, [1, 2, 3], cfg, SamplingParams(temperature=1.0, seed=124, max_new_tokens=30,
                                                            ignore_eos=True))
    assert c.tokens != a.tokens


def test_empty_prompt_rejected() -> None:
    with pytest.raises(ValueError):
        isd_generate(tiny_model(), [], DecodeConfig(), SamplingParams())


def test_risd_gated_lora_keeps_base_greedy_output() -> None:
    """With gated LoRA (gate on draft MASKs only) the anchor is the base model: ISD == base AR."""
    base, adapted = tiny_risd_pair(11)
    assert adapted.has_adapters and not base.has_adapters
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompt = [4, 8, 15, 16, 23, 42]
    ref = ar_generate(base, prompt, params)
    for n in (2, 4):
        out = isd_generate(adapted, prompt, DecodeConfig(stride=n), params)
        assert out.tokens == ref.tokens
    # the adapters really change the drafts (else this test could not fail)
    ids, pos = torch.tensor(prompt + [base.cfg.mask_token_id] * 3), torch.arange(len(prompt) + 3)
    gate = torch.tensor([0.0] * len(prompt) + [1.0] * 3)
    a = adapted.logits(adapted.hidden(ids, pos, gate=gate))[0]
    b = base.logits(base.hidden(ids, pos))[0]
    assert torch.equal(a[: len(prompt)], b[: len(prompt)])
    assert not torch.allclose(a[len(prompt):], b[len(prompt):])


def test_window_layout_with_fallback_branches() -> None:
    from idlm.decode.isd import window_layout

    offsets, seen = window_layout(2, 2, fallback=True)
    # pending, spec1, spec2, MASK, MASK | branch 0 at offsets 1, 2 | branch 1 at offsets 2, 3
    assert offsets == [0, 1, 2, 3, 4, 1, 2, 2, 3]
    assert seen[:5, :5].equal(torch.ones(5, 5, dtype=torch.bool).tril()) and not seen[:5, 5:].any()
    assert seen[5].nonzero().flatten().tolist() == [0, 5]  # branch 0 sees pending, itself
    assert seen[6].nonzero().flatten().tolist() == [0, 5, 6]
    assert seen[7].nonzero().flatten().tolist() == [0, 1, 7]  # branch 1 sees pending, spec1, itself
    assert seen[8].nonzero().flatten().tolist() == [0, 1, 7, 8]
    offsets, seen = window_layout(2, 2, fallback=False)
    assert offsets == [0, 1, 2, 3, 4] and seen.equal(torch.ones(5, 5, dtype=torch.bool).tril())
    assert window_layout(0, 3, fallback=True)[0] == [0, 1, 2, 3]  # a cold step has no branches


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_coupled_sampled_isd_equals_coupled_sampled_ar(n: int, fallback: bool) -> None:
    """Coupled sampling keys each token's randomness on (seed, index), so sampled ISD emits exactly
    the tokens sampled AR emits with the same seed, whatever the stride, and a different seed differs."""
    model = tiny_model(seed=4)
    cfg = DecodeConfig(stride=n, fallback=fallback, sampling_mode="coupled")
    for seed in (0, 1, 2):
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed, max_new_tokens=40, ignore_eos=True)
        ar = ar_generate(model, [7, 3, 11], params, sampling_mode="coupled")
        isd = isd_generate(model, [7, 3, 11], cfg, params)
        assert isd.tokens == ar.tokens
        assert isd.stats.rejects > 0 or n == 2  # drafts were really judged, not rubber-stamped
    other = ar_generate(model, [7, 3, 11], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_new_tokens=40,
                                                         ignore_eos=True), sampling_mode="coupled")
    assert other.tokens != ar.tokens


def test_window_layout_with_tree_branches() -> None:
    from idlm.decode.isd import window_layout

    offsets, seen = window_layout(2, 2, fallback=True, tree=(1,))
    # main 0..4 | fallback branches 5-6, 7-8 | tree branch of spec 1 at offsets 2, 3 (slots 9, 10)
    assert offsets == [0, 1, 2, 3, 4, 1, 2, 2, 3, 2, 3]
    assert seen[9].nonzero().flatten().tolist() == [0, 1, 9]  # sees what fallback branch 1 sees
    assert seen[10].nonzero().flatten().tolist() == [0, 1, 9, 10]
    assert not seen[:9, 9:].any()  # nothing else sees a tree slot
    offsets, seen = window_layout(3, 3, fallback=False, tree=(0, 2))
    assert offsets == [0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 3, 4, 5]
    assert seen[7].nonzero().flatten().tolist() == [0, 7]
    assert seen[10].nonzero().flatten().tolist() == [0, 1, 2, 10]
    assert seen[12].nonzero().flatten().tolist() == [0, 1, 2, 10, 11, 12]


def test_build_window_tree_ids_gate_and_choice() -> None:
    from idlm.decode.isd import TREE_MIN_VALUE, ISDState, build_window

    m = 99
    state = ISDState(5, [6, 7, 8], None, alts=[16, 17, 18], alt_value=[0.30, 0.02, 0.20])
    assert state.tree_positions(1) == (0,) and state.tree_positions(3) == (0, 2)  # 0.02 < TREE_MIN_VALUE
    assert TREE_MIN_VALUE > 0.02
    win = build_window(state, 3, fallback=True, mask_id=m, tree=2)
    assert win.tree == (0, 2)
    assert win.ids == [5, 6, 7, 8, m, m, m] + [m] * 9 + [16, m, m, 18, m, m]
    assert win.used == len(win.ids) == 22 and win.tree_start == 16
    gate = win.gate().tolist()
    assert gate[:4] == [0.0] * 4 and gate[4:16] == [1.0] * 12  # clean slots off, MASKs on
    assert gate[16:] == [0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # a tree branch's alternative is a clean slot
    logits = torch.arange(22.0)[:, None].expand(22, 4)
    main, fb = win.split(logits)
    assert main.shape == (7, 4) and fb.shape == (3, 3, 4) and fb[2, 0, 0] == 13
    assert win.tree_logits(logits)[1, 0, 0] == 19
    # a smaller stride drops the positions it does not verify; tree=0 and AR steps have no branches
    assert build_window(state, 2, fallback=False, mask_id=m, tree=2).tree == (0,)
    assert build_window(state, 3, fallback=False, mask_id=m).tree == ()
    assert build_window(state, 0, fallback=False, mask_id=m, tree=2).ids == [5]


def _record_steps(monkeypatch) -> list:
    from idlm.decode import isd

    steps, real = [], isd.isd_step

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        steps.append(out)
        return out

    monkeypatch.setattr(isd, "isd_step", spy)
    return steps


@pytest.mark.parametrize("fallback", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("n", [2, 3, 5])
def test_greedy_isd_with_trees_equals_greedy_ar_tiny(family: str, n: int, fallback: bool, monkeypatch) -> None:
    """Greedy ISD with draft trees == greedy AR; after a tree hit, the next step's first draft (the
    tree branch's clean slot) always passes in bf16: that slot computed the base model's exact next token."""
    steps = _record_steps(monkeypatch)
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(seed=n, family=family).to(dtype)
        for prompt in ([3, 17, 5, 9], [11, 2, 40, 41, 7, 60, 1], [1, 1, 1]):
            ar = ar_generate(model, prompt, params)
            steps.clear()
            isd = isd_generate(model, prompt, DecodeConfig(stride=n, fallback=fallback, tree=n - 1), params)
            assert isd.tokens == ar.tokens
            if dtype == torch.bfloat16:  # native forward: the branch's clean slot is bit-exact (fp32: rounding)
                for a, b in itertools.pairwise(steps):
                    if a.branch == "tree":
                        assert b.verdict.accepted >= 1


def test_trees_are_used_and_keep_risd_output(monkeypatch) -> None:
    """R-ISD with trees == base AR, the tree path really runs, and a hit's next draft always passes
    (the alternative's slot is gated off: with the adapter on it, its draft would be the adapter's)."""
    steps = _record_steps(monkeypatch)
    base, adapted = (m.to(torch.bfloat16) for m in tiny_risd_pair(11))  # bf16: the native forward, rows exact
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    hits = 0
    for prompt in ([4, 8, 15, 16, 23, 42], [9, 9, 2], [30, 1, 77, 5]):
        ref = ar_generate(base, prompt, params)
        for n in (2, 3, 4):
            steps.clear()
            out = isd_generate(adapted, prompt, DecodeConfig(stride=n, tree=n - 1), params)
            assert out.tokens == ref.tokens
            assert out.stats.tree_hits == sum(s.branch == "tree" for s in steps)
            hits += out.stats.tree_hits
            for a, b in itertools.pairwise(steps):
                if a.branch == "tree":
                    assert b.verdict.accepted >= 1
    assert hits >= 3


@pytest.mark.parametrize("n", [2, 4])
def test_coupled_sampled_isd_with_trees_equals_coupled_ar(n: int) -> None:
    model = tiny_model(seed=4)
    cfg = DecodeConfig(stride=n, sampling_mode="coupled", tree=2)
    for seed in (0, 1, 2):
        params = SamplingParams(temperature=0.9, top_p=0.95, seed=seed, max_new_tokens=40, ignore_eos=True)
        assert isd_generate(model, [7, 3, 11], cfg, params).tokens == \
            ar_generate(model, [7, 3, 11], params, sampling_mode="coupled").tokens
