"""A decode window reproduces one-token steps bit for bit (the basis of lossless greedy ISD).

Greedy ISD == greedy AR holds exactly only if the logits of row i of a window equal, to the last bit,
the logits of a one-token step at the same position over the same prefix, and the K/V the window
writes equal what the steps write. Token-level tests on tiny models cannot see last-bit drift (they
have no near-ties), so this compares raw tensors with ``torch.equal`` on a model with the default
model's layer shapes (SmolLM2-135M: hidden 576, 9 heads over 3 K/V heads of 64, MLP 1536).
"""

from __future__ import annotations

import pytest
import torch

from idlm.model import Decoder, ModelConfig


def _shaped_like_smollm2(dtype: torch.dtype, layers: int = 2) -> Decoder:
    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                      num_layers=layers, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
                      tie_embeddings=True, mask_token_id=512, num_embeddings=513, eos_token_ids=(2,))
    g = torch.Generator().manual_seed(0)
    m = Decoder(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else p.shape[1] ** -0.5))
    return m.eval().requires_grad_(False).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.inference_mode()  # as in decoding: row-stable matmuls are an inference-only measure
def test_window_rows_equal_one_token_steps(dtype: torch.dtype) -> None:
    model = _shaped_like_smollm2(dtype)
    g = torch.Generator().manual_seed(1)
    checked = 0
    for prefix in (1, 5, 16, 37, 130):
        for t in (2, 3, 5, 7, 9) if prefix != 37 else (16, 25, 64):  # 64: N = 8 with fallback
            ids = torch.randint(0, 512, (prefix + t,), generator=g)
            pos = torch.arange(prefix + t)
            steps, win = model.new_cache(capacity=256), model.new_cache(capacity=256)
            for c in (steps, win):  # identical prefill
                model.hidden(ids[:prefix], pos[:prefix], c)
            one = torch.cat([model.logits(model.hidden(ids[i:i + 1], pos[i:i + 1], steps))
                             for i in range(prefix, prefix + t)], dim=1)
            many = model.logits(model.hidden(ids[prefix:], pos[prefix:], win))
            assert torch.equal(one, many), f"logits differ: prefix {prefix}, window {t}, {dtype}"
            n = prefix + t
            assert torch.equal(steps.k[..., :n, :], win.k[..., :n, :]), f"K differs: prefix {prefix}, window {t}"
            assert torch.equal(steps.v[..., :n, :], win.v[..., :n, :]), f"V differs: prefix {prefix}, window {t}"
            checked += 1
    assert checked == 23


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.inference_mode()
def test_fallback_window_keeps_main_rows_exact_and_branches_see_their_own_context(dtype: torch.dtype) -> None:
    """An ISD window with fallback branches (``window_mask``): the main chain still equals one-token
    steps bit for bit, and branch j computes, bit for bit, what a window appended after main slots 0..j
    computes."""
    from idlm.decode.isd import window_layout

    model = _shaped_like_smollm2(dtype)
    g = torch.Generator().manual_seed(2)
    mask_id = model.cfg.mask_token_id
    for prefix, n_specs, n_drafts in ((9, 2, 2), (40, 3, 3), (17, 4, 4)):
        offsets, seen = window_layout(n_specs, n_drafts, fallback=True)
        main = 1 + n_specs + n_drafts
        ids = torch.randint(0, 512, (prefix + 1 + n_specs,), generator=g)
        window = torch.cat([ids[prefix:], torch.full((len(offsets) - 1 - n_specs,), mask_id)])
        cache = model.new_cache(capacity=256)
        model.hidden(ids[:prefix], torch.arange(prefix), cache)
        out = model.logits(model.hidden(window, prefix + torch.tensor(offsets), cache, window_mask=seen))[0]
        steps = model.new_cache(capacity=256)
        model.hidden(ids[:prefix], torch.arange(prefix), steps)
        for i in range(1 + n_specs):  # clean rows: exactly one-token steps
            one = model.logits(model.hidden(ids[prefix + i: prefix + i + 1], torch.tensor([prefix + i]), steps))[0, 0]
            assert torch.equal(out[i], one), f"main row {i} drifted ({dtype}, {n_specs} specs)"
        for j in range(n_specs):  # branch j == a plain causal window of MASKs after main slots 0..j
            ref = model.new_cache(capacity=256)
            model.hidden(ids[: prefix + j + 1], torch.arange(prefix + j + 1), ref)
            rows = model.logits(model.hidden(torch.full((n_drafts,), mask_id),
                                             prefix + j + 1 + torch.arange(n_drafts), ref))[0]
            got = out[main + j * n_drafts: main + (j + 1) * n_drafts]
            assert torch.equal(got, rows), f"branch {j} drifted ({dtype})"  # the same keys, in the same order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.inference_mode()
def test_tree_branches_keep_main_rows_exact_and_their_alternative_is_a_one_token_step(dtype: torch.dtype) -> None:
    """A window with fallback and draft-tree branches: main-chain rows equal one-token steps bit for bit,
    and a tree branch's first slot (the drafter's second choice for spec j, a clean slot) equals the
    one-token step of that token after main slots 0..j, bit for bit: that is what lets the next step's
    first draft, taken from it, pass (attention visits exactly a row's visible keys, in their order)."""
    from idlm.decode.isd import window_layout

    model = _shaped_like_smollm2(dtype)
    g = torch.Generator().manual_seed(3)
    mask_id = model.cfg.mask_token_id
    for prefix, n_specs, n_drafts, tree in ((9, 2, 2, (0, 1)), (40, 3, 3, (1,)), (17, 4, 4, (0, 3))):
        offsets, seen = window_layout(n_specs, n_drafts, fallback=True, tree=tree)
        ids = torch.randint(0, 512, (prefix + 1 + n_specs,), generator=g)
        alts = torch.randint(0, 512, (len(tree),), generator=g)
        window = torch.cat([ids[prefix:], torch.full((n_drafts + n_specs * n_drafts,), mask_id)]
                           + [torch.cat([a[None], torch.full((n_drafts - 1,), mask_id)]) for a in alts])
        assert len(window) == len(offsets)
        cache = model.new_cache(capacity=256)
        model.hidden(ids[:prefix], torch.arange(prefix), cache)
        out = model.logits(model.hidden(window, prefix + torch.tensor(offsets), cache, window_mask=seen))[0]
        steps = model.new_cache(capacity=256)
        model.hidden(ids[:prefix], torch.arange(prefix), steps)
        for i in range(1 + n_specs):
            one = model.logits(model.hidden(ids[prefix + i: prefix + i + 1], torch.tensor([prefix + i]), steps))[0, 0]
            assert torch.equal(out[i], one), f"main row {i} drifted ({dtype}, tree {tree})"
        start = 1 + n_specs + n_drafts + n_specs * n_drafts
        for b, j in enumerate(tree):
            ref = model.new_cache(capacity=256)
            model.hidden(ids[: prefix + j + 1], torch.arange(prefix + j + 1), ref)
            one = model.logits(model.hidden(alts[b: b + 1], torch.tensor([prefix + j + 1]), ref))[0, 0]
            assert torch.equal(out[start + b * n_drafts], one), f"tree branch {j} drifted ({dtype})"
