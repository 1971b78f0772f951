"""Gated LoRA (spec §4): gate off = base model exactly; clean positions and their KV untouched."""

from __future__ import annotations

import pytest
import torch

from idlm.model import load_folder
from idlm.model.lora import GatedLoRAProj, MaskEmbedding, add_lora, load_lora, lora_state_dict


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _window(model, ids, gate=None, prefix=6):
    """Prefill ``ids[:prefix]``, then one window over the rest; returns (logits, cache)."""
    cache = model.new_cache(1, 64)
    model.hidden(ids[:prefix], torch.arange(prefix), cache)
    pos = torch.arange(prefix, len(ids))
    h = model.hidden(ids[prefix:], pos, cache, gate=gate)
    return model.logits(h[0]), cache


def test_gate_off_is_exactly_the_base_model(tiny_folder):
    base, lora = load_folder(tiny_folder), load_folder(tiny_folder)
    add_lora(lora, rank=4, alpha=8)
    _randomize(lora)
    ids = torch.randint(0, 128, (12,))
    with torch.no_grad():
        assert torch.equal(base(ids, torch.arange(12)), lora(ids, torch.arange(12)))
        zero = lora(ids, torch.arange(12), gate=torch.zeros(12))
        assert torch.equal(base(ids, torch.arange(12)), zero)


def test_clean_logits_and_kv_equal_base_with_gate_on_masks(tiny_folder):
    base, lora = load_folder(tiny_folder), load_folder(tiny_folder)
    add_lora(lora, rank=4, alpha=8)
    _randomize(lora)
    m = base.cfg.mask_token_id
    ids = torch.tensor([5, 9, 17, 33, 2, 7, 40, 41, 42, m, m, m])  # prefix 6, pending+specs 3, MASKs 3
    gate = (ids[6:] == m).float()
    with torch.no_grad():
        lb, cb = _window(base, ids)
        ll, cl = _window(lora, ids, gate)
    assert torch.equal(lb[:3], ll[:3])  # clean window positions: bit-identical anchor logits
    assert not torch.allclose(lb[3:], ll[3:])  # the MASK positions did change
    assert torch.equal(cb.k[..., :9, :], cl.k[..., :9, :]) and torch.equal(cb.v[..., :9, :], cl.v[..., :9, :])


def test_gated_rows_equal_the_dense_formula():
    base = torch.nn.Linear(8, 6)
    from idlm.model.decoder import Proj

    p = Proj(8, 6)
    p.load_state_dict(base.state_dict())
    lp = GatedLoRAProj(p, rank=3, alpha=6)
    torch.nn.init.normal_(lp.lora_B)
    x, gate = torch.randn(2, 5, 8), torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]]).float()[..., None]
    x.requires_grad_(True)
    dense = base(x) + gate * 2.0 * (x @ lp.lora_A.T @ lp.lora_B.T)
    got = lp(x, gate)
    torch.testing.assert_close(got, dense)
    probe = torch.randn_like(dense)
    g_dense = torch.autograd.grad((dense * probe).sum(), [x, lp.lora_A, lp.lora_B])
    g_got = torch.autograd.grad((got * probe).sum(), [x, lp.lora_A, lp.lora_B])
    for a, b in zip(g_dense, g_got):
        torch.testing.assert_close(a, b)
    assert lp.weight is p.weight  # shared, not copied


def test_mask_row_only_feeds_mask_inputs(tiny_folder):
    model = load_folder(tiny_folder)
    add_lora(model, rank=2, alpha=4)
    assert isinstance(model.embed, MaskEmbedding)
    m = model.cfg.mask_token_id
    ids = torch.tensor([[3, m, 4, m]])
    model.embed(ids).sum().backward()
    assert model.embed.mask_row.grad is not None and model.embed.weight.grad is None
    with torch.no_grad():
        model.embed.mask_row.add_(1.0)
        out = model.embed(ids)
    assert torch.equal(out[0, 0], model.embed.weight[3]) and torch.equal(out[0, 1], model.embed.mask_row)


def test_state_dict_round_trip(tiny_folder):
    a = load_folder(tiny_folder)
    add_lora(a, rank=4, alpha=16, targets=("qkv", "down"))
    _randomize(a, 3)
    state = lora_state_dict(a)
    assert "mask_embedding" in state and float(state["lora_alpha"]) == 16
    b = load_lora(load_folder(tiny_folder), state)
    m = a.cfg.mask_token_id
    ids, gate = torch.tensor([4, 5, m, m]), torch.tensor([0.0, 0.0, 1.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(a(ids, torch.arange(4), gate=gate), b(ids, torch.arange(4), gate=gate))
    assert not any(p.requires_grad for p in b.parameters())


def test_gated_lora_decode_fast_path_equals_general_path() -> None:
    """Under no_grad a 0/1 gate takes the decoding path ([W; A] fused, B on every row, added under
    the gate); it must compute what the training (index_select / index_add) path computes, and
    other gates must still work."""
    import torch

    from idlm.model.decoder import Proj
    from idlm.model.lora import GatedLoRAProj

    torch.manual_seed(0)
    proj = GatedLoRAProj(Proj(16, 24), rank=4, alpha=8.0)
    torch.nn.init.normal_(proj.lora_B)
    x = torch.randn(1, 7, 16)
    for gate in (torch.tensor([0, 0, 1, 1, 1, 0, 0.0]), torch.tensor([1, 0, 1, 0, 0, 1, 0.0]),
                 torch.tensor([0, 0, 0.5, 1, 0, 0, 0]), torch.zeros(7)):
        with torch.enable_grad():
            ref = proj(x, gate[None].clone())  # grad mode: always the general path
        with torch.no_grad():
            got = proj(x, gate[None].clone())
        torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
        with torch.no_grad():
            base = proj(x)  # no gate: the base projection (row-stable, as in decoding)
        assert torch.equal(got[0, gate == 0], base[0, gate == 0])  # ungated rows are the base exactly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_path_is_exact_for_clean_rows_and_layout_free_for_drafts(dtype: torch.dtype) -> None:
    """On SmolLM2-135M's projection shapes: fusing A into the base matmul leaves every ungated row
    bit-identical to the base projection, and a gated row's output does not depend on which other
    rows are gated or how many rows share the call (the engine mixes requests' drafts in one batch)."""
    from idlm.model.decoder import Proj
    from idlm.model.lora import GatedLoRAProj

    torch.manual_seed(0)
    for fan_in, fan_out in ((576, 960), (576, 576), (576, 3072), (1536, 576)):
        proj = GatedLoRAProj(Proj(fan_in, fan_out, bias=False), rank=32, alpha=64.0).to(dtype)
        torch.nn.init.normal_(proj.lora_B, std=0.02)
        x = torch.randn(1, 40, fan_in).to(dtype)
        gate = torch.zeros(1, 40, 1, dtype=dtype)
        gate[0, 3:9] = 1
        gate[0, 20:31] = 1
        with torch.inference_mode():
            base = proj(x)
            got = proj(x, gate)
            alone = proj(x[:, 3:9], torch.ones(1, 6, 1, dtype=dtype))  # one request's drafts, alone
        clean = gate[0, :, 0] == 0
        assert torch.equal(got[0, clean], base[0, clean])
        assert not torch.equal(got[0, ~clean], base[0, ~clean])  # the adapter really acts
        assert torch.equal(got[0, 3:9], alone[0])
