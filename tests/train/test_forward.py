"""Training–inference alignment (spec §10.3) and equivalence of the training forwards."""

from __future__ import annotations

import pytest
import torch

from idlm.model.lora import add_lora
from idlm.train.batch import Sample, collate
from idlm.train.forward import forward_clean_prefix, forward_joint
from idlm.train.mask import packed_layout, training_mask

ATOL = 2e-5


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _sample(prompt_len: int, resp_len: int, seed: int = 0) -> Sample:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (prompt_len + resp_len,), generator=g).tolist()
    return Sample(tuple(ids[:prompt_len]), tuple(ids[prompt_len:]))


def _inference_mask_logits(model, x: list[int], clean_len: int, n_masks: int, gate: bool):
    """Prefill x[:clean_len] (causal, gate off), then a window of n_masks MASKs over the cache."""
    m = model.cfg.mask_token_id
    cache = model.new_cache(1, 64)
    h_pre = model.hidden(torch.tensor(x[:clean_len]), torch.arange(clean_len), cache)
    pos = torch.arange(clean_len, clean_len + n_masks)
    g = torch.ones(n_masks) if gate else None
    h_win = model.hidden(torch.full((n_masks,), m), pos, cache, gate=g)
    return model.logits(h_pre[0, -1]), model.logits(h_win[0])


@pytest.mark.parametrize("block,prompt_len", [(1, 4), (2, 4), (3, 4), (3, 5), (4, 6)])
@pytest.mark.parametrize("lora", [False, True])
def test_mask_logits_match_an_inference_window(tiny_model, block, prompt_len, lora):
    """The k-th MASK after the last visible clean token c_s predicts x[s+k+1] identically in a
    training forward (block boundary at the first MASK or inside the prompt) and in inference."""
    model = tiny_model
    if lora:
        add_lora(model, rank=4, alpha=8)
        _randomize_lora(model)
    s = _sample(prompt_len, 11)
    x = list(s.prompt_ids) + list(s.response_ids)
    batch = collate([[s]], block, model.cfg.mask_token_id, pad_multiple=1, trim_prompt=False)
    with torch.no_grad():
        halves = (forward_clean_prefix if lora else forward_joint)(model, batch)
        noisy_logits, clean_logits = model.logits(halves.noisy[0]), model.logits(halves.clean[0])
    checked = 0
    for b in range(len(x) // block + 1):
        first = max(b * block, prompt_len)  # first MASK of this block; x[:first] is clean context
        n_masks = min((b + 1) * block, len(x)) - first
        if n_masks <= 0:
            continue
        anchor, window = _inference_mask_logits(model, x, first, n_masks, gate=lora)
        torch.testing.assert_close(window, noisy_logits[first:first + n_masks], atol=ATOL, rtol=0)
        torch.testing.assert_close(anchor, clean_logits[first - 1], atol=ATOL, rtol=0)
        checked += n_masks
    assert checked == len(s.response_ids)


def test_clean_prefix_forward_equals_joint_forward(tiny_model):
    model = tiny_model
    add_lora(model, rank=4, alpha=8)
    _randomize_lora(model, 1)
    rows = [[_sample(5, 9, 1), _sample(2, 6, 2)], [_sample(7, 12, 3)]]
    batch = collate(rows, 3, model.cfg.mask_token_id)
    a, b = forward_joint(model, batch), forward_clean_prefix(model, batch)
    torch.testing.assert_close(a.noisy, b.noisy, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.clean, b.clean, atol=ATOL, rtol=0)
    # and their gradients w.r.t. the adapters agree
    params = [p for p in model.parameters() if p.requires_grad]
    probe = torch.randn(a.noisy.shape, generator=torch.Generator().manual_seed(0))
    ga = torch.autograd.grad((a.noisy * probe).sum(), params)
    gb = torch.autograd.grad((b.noisy * probe).sum(), params)
    for x, y in zip(ga, gb):
        assert x.norm() > 0 and (x - y).norm() <= 1e-5 * x.norm()


def test_packing_equals_separate_rows(tiny_model):
    model = tiny_model
    s1, s2 = _sample(4, 8, 4), _sample(6, 5, 5)
    m = model.cfg.mask_token_id
    with torch.no_grad():
        packed = forward_joint(model, collate([[s1, s2]], 2, m, pad_multiple=1))
        one = forward_joint(model, collate([[s1]], 2, m, pad_multiple=1))
        two = forward_joint(model, collate([[s2]], 2, m, pad_multiple=1))
    n1 = one.noisy.shape[1]
    torch.testing.assert_close(packed.noisy[0, :n1], one.noisy[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.noisy[0, n1:], two.noisy[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(packed.clean[0], torch.cat([one.clean[0], two.clean[0]]), atol=ATOL, rtol=0)


def test_interleaved_layout_gives_the_same_hidden_states(tiny_model):
    """Our grouped row layout is only a permutation of the spec's interleaved one."""
    model = tiny_model
    lengths, block, m = [6, 4], 2, model.cfg.mask_token_id
    g = torch.Generator().manual_seed(7)
    xs = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    prompts = [2, 1]

    def noisy(x, p):
        y = x.clone()
        y[p:] = m
        return y

    def run(interleaved):
        lay = packed_layout(lengths, interleaved)
        if interleaved:
            ids = torch.cat([t for x, p in zip(xs, prompts) for t in (noisy(x, p), x)])
        else:
            ids = torch.cat([noisy(x, p) for x, p in zip(xs, prompts)] + xs)
        return model.hidden(ids[None], lay.loc[None], attn_mask=training_mask(lay, block)[None])[0]

    with torch.no_grad():
        grouped, inter = run(False), run(True)
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19])
    torch.testing.assert_close(grouped, inter[perm], atol=ATOL, rtol=0)
