"""Numerical parity of our Decoder with transformers, and self-consistency of its attention paths.

* Logits of ``idlm.model.load_folder`` equal transformers' logits (fp32) on tiny random Llama /
  Qwen2 / Qwen3 checkpoints: tied and untied heads, biases, q/k norm, RoPE scaling variants.
* The KV-cache path (prefill + multi-token window, single-token steps, ``crop`` rollback) equals a
  full no-cache forward; an explicit boolean mask equal to causal equals the causal path; a
  left-padded batch of two with a mask equals the unpadded single-sequence runs.
* The SDAR (reference I-DLM) layout loads without trust_remote_code and equals its Qwen3 twin.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from idlm.model import Decoder, load_folder

VOCAB = 200
FP32 = {"rtol": 1e-4, "atol": 1e-4}  # HF vs ours: different op order, same fp32 math
TIGHT = {"rtol": 1e-5, "atol": 1e-5}  # ours vs ours: same kernels, different attention layout


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _positions(b: int, t: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + t).expand(b, t).contiguous()


@torch.no_grad()
def _hf_logits(hf, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids, position_ids=positions, use_cache=False).logits.float()


@torch.no_grad()
def _assert_parity(folder: Path, hf_reference, t: int = 24, starts=(0, 150)) -> torch.Tensor:
    """Compare ours with HF for a batch of 2 at each start position; returns our last logits."""
    ours = load_folder(folder)
    hf = hf_reference(folder)
    assert ours.cfg.vocab_size == VOCAB and ours.cfg.mask_is_new_row
    out = None
    for i, start in enumerate(starts):
        ids, pos = _ids(2, t, seed=i), _positions(2, t, start)
        out = ours(ids, pos)
        ref = _hf_logits(hf, ids, pos)
        assert out.shape == ref.shape == (2, t, VOCAB) and out.dtype == torch.float32
        assert ref.abs().max() > 1.0  # the random init gives logits with real spread
        assert_close(out, ref, **FP32)
    return out


# --------------------------------------------------------------------------------------------
# Parity with transformers


PARITY_CASES = {
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-attn-mlp-bias": ("llama", {"attention_bias": True, "mlp_bias": True, "num_hidden_layers": 3}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "qwen2-qkv-bias": ("qwen2", {"tie_word_embeddings": False}),
    "qwen2-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen3-qk-norm": ("qwen3", {"tie_word_embeddings": False, "num_hidden_layers": 3}),
    "qwen3-tied-attn-bias": ("qwen3", {"tie_word_embeddings": True, "attention_bias": True}),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_parity_with_transformers(case: str, tiny_checkpoint, hf_reference) -> None:
    family, overrides = PARITY_CASES[case]
    folder = tiny_checkpoint(family, **overrides)
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json["model_type"] == family
    _assert_parity(folder, hf_reference)
    ours = load_folder(folder)
    cfg = ours.cfg
    assert cfg.tie_embeddings == overrides.get("tie_word_embeddings", False)
    assert (ours.lm_head is None) == cfg.tie_embeddings
    if family == "qwen2":
        assert cfg.qkv_bias and not cfg.o_bias
    if family == "qwen3":
        assert cfg.qk_norm
    if overrides.get("attention_bias"):
        assert cfg.qkv_bias and cfg.o_bias
    if overrides.get("mlp_bias"):
        assert cfg.mlp_bias


ORIG_MAX = 32
ROPE_CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIG_MAX},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIG_MAX},
    "yarn-untruncated-betas": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": ORIG_MAX,
                               "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.3,
                              "original_max_position_embeddings": ORIG_MAX},
}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("variant", list(ROPE_CASES))
def test_rope_scaling_parity(variant: str, family: str, tiny_checkpoint, hf_reference) -> None:
    rope = {"rope_theta": 10000.0, **ROPE_CASES[variant]}
    folder = tiny_checkpoint(family, name="scaled", rope_parameters=rope, max_position_embeddings=256)
    # positions run far past original_max_position_embeddings (32)
    scaled = _assert_parity(folder, hf_reference, t=20, starts=(0, 100, 200))
    assert load_folder(folder).cfg.rope_scaling["rope_type"] == rope["rope_type"]

    # the same weights with plain RoPE give different logits: the scaling is really applied
    plain = tiny_checkpoint(family, name="plain", rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            max_position_embeddings=256)
    with torch.no_grad():
        unscaled = load_folder(plain)(_ids(2, 20, seed=2), _positions(2, 20, 200))
    assert (scaled - unscaled).abs().max() > 1e-2


def test_rope_theta_is_read(tiny_checkpoint, hf_reference) -> None:
    folder = tiny_checkpoint("qwen3", rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    assert load_folder(folder).cfg.rope_theta == 1_000_000.0
    _assert_parity(folder, hf_reference)


# --------------------------------------------------------------------------------------------
# KV cache, explicit masks, batching (ours vs ours)


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_qwen3"])
def model(request) -> Decoder:
    return load_folder(request.getfixturevalue(request.param))


@torch.no_grad()
def test_cache_prefill_then_window_equals_full_forward(model: Decoder) -> None:
    ids = _ids(1, 24, seed=5)
    full = model(ids, _positions(1, 24))
    cache = model.new_cache(batch=1, capacity=8)  # small capacity: forces growth
    pre = model(ids[:, :10], _positions(1, 10), cache=cache)
    assert cache.length == 10
    assert_close(pre, full[:, :10], **TIGHT)
    win = model(ids[:, 10:17], _positions(1, 7, 10), cache=cache)  # multi-token window
    assert cache.length == 17 and cache.capacity >= 17
    assert_close(win, full[:, 10:17], **TIGHT)
    for j in range(17, 24):  # single-token AR steps
        step = model(ids[:, j:j + 1], _positions(1, 1, j), cache=cache)
        assert_close(step, full[:, j:j + 1], **TIGHT)
    assert cache.length == 24


@torch.no_grad()
def test_cache_crop_rollback_equals_fresh_run(model: Decoder) -> None:
    ids = _ids(1, 20, seed=6)
    cache = model.new_cache()
    model(ids[:, :12], _positions(1, 12), cache=cache)
    model(ids[:, 12:20], _positions(1, 8, 12), cache=cache)  # a window we then reject
    cache.crop(9)
    assert cache.length == 9
    other = _ids(1, 6, seed=7)
    assert not torch.equal(other, ids[:, 9:15])
    got = model(other, _positions(1, 6, 9), cache=cache)
    assert cache.length == 15
    fresh_ids = torch.cat([ids[:, :9], other], dim=1)
    fresh = model(fresh_ids, _positions(1, 15))
    assert_close(got, fresh[:, 9:], **TIGHT)
    # and the rejected tokens really mattered: the logits differ from the pre-rollback sequence
    before = model(ids[:, :15], _positions(1, 15))
    assert (before[:, 9:] - got).abs().max() > 1e-2
    with pytest.raises(ValueError):
        cache.crop(16)
    with pytest.raises(ValueError):
        cache.crop(-1)


@torch.no_grad()
def test_batched_cache_equals_per_sequence(model: Decoder) -> None:
    ids = _ids(2, 16, seed=8)
    full = model(ids, _positions(2, 16))
    cache = model.new_cache(batch=2)
    model(ids[:, :11], _positions(2, 11), cache=cache)
    win = model(ids[:, 11:], _positions(2, 5, 11), cache=cache)
    assert_close(win, full[:, 11:], **TIGHT)
    for b in range(2):
        assert_close(model(ids[b:b + 1], _positions(1, 16)), full[b:b + 1], **TIGHT)
    with pytest.raises(ValueError):
        model(ids[:1, :3], _positions(1, 3, 16), cache=cache)  # batch mismatch


@torch.no_grad()
def test_explicit_causal_mask_equals_causal_path(model: Decoder) -> None:
    t = 14
    ids, pos = _ids(2, t, seed=9), _positions(2, t, 3)
    causal = model(ids, pos)
    tril = torch.ones(t, t, dtype=torch.bool).tril()
    assert_close(model(ids, pos, attn_mask=tril), causal, **TIGHT)  # (T, T)
    assert_close(model(ids, pos, attn_mask=tril.expand(2, t, t)), causal, **TIGHT)  # (B, T, T)
    assert_close(model(ids, pos, attn_mask=tril[None, None]), causal, **TIGHT)  # (1, 1, T, T)
    # a non-causal mask changes the result (the mask is not ignored)
    full = torch.ones(t, t, dtype=torch.bool)
    assert (model(ids, pos, attn_mask=full)[:, :-1] - causal[:, :-1]).abs().max() > 1e-2
    with pytest.raises(ValueError):
        model(ids, pos, cache=model.new_cache(batch=2), attn_mask=tril)


@torch.no_grad()
def test_left_padded_batch_with_mask(model: Decoder) -> None:
    """Row 0: 12 real tokens; row 1: 4 pads then 8 real tokens (positions restart at 0)."""
    t, pad = 12, 4
    a, b = _ids(1, t, seed=10)[0], _ids(1, t - pad, seed=11)[0]
    ids = torch.stack([a, torch.cat([torch.zeros(pad, dtype=torch.long), b])])
    pos = torch.stack([torch.arange(t), torch.cat([torch.zeros(pad, dtype=torch.long), torch.arange(t - pad)])])
    mask = torch.ones(2, t, t, dtype=torch.bool).tril()
    mask[1, :, :pad] = False  # nobody attends to pads ...
    mask[1, torch.arange(pad), torch.arange(pad)] = True  # ... except each pad to itself (no empty rows)
    out = model(ids, pos, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert_close(out[0:1], model(a[None], torch.arange(t)[None]), **TIGHT)
    assert_close(out[1:2, pad:], model(b[None], torch.arange(t - pad)[None]), **TIGHT)
    # unbatched 1-D ids/positions are accepted and give the same logits
    assert_close(model(a, torch.arange(t)), out[0:1], **TIGHT)


# --------------------------------------------------------------------------------------------
# SDAR layout (reference I-DLM checkpoints)


def test_sdar_layout_loads_as_qwen3(tiny_checkpoint, tmp_path: Path) -> None:
    qwen3 = tiny_checkpoint("qwen3", name="qwen3", tie_word_embeddings=False)
    sdar = tmp_path / "sdar"
    sdar.mkdir()
    conf = json.loads((qwen3 / "config.json").read_text())
    mask_id = 150
    conf.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=4, mask_token_id=mask_id,
                use_regular_causal=True,
                auto_map={"AutoConfig": "configuration_sdar.SDARConfig",
                          "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"})
    (sdar / "config.json").write_text(json.dumps(conf))
    shutil.copy(qwen3 / "model.safetensors", sdar / "model.safetensors")

    twin, ours = load_folder(qwen3), load_folder(sdar)
    assert ours.cfg.model_type == "qwen3" and ours.cfg.qk_norm
    assert ours.cfg.mask_token_id == mask_id and not ours.cfg.mask_is_new_row
    assert ours.embed.weight.shape[0] == VOCAB  # an in-vocab MASK adds no row
    assert twin.cfg.mask_token_id == VOCAB and twin.cfg.mask_is_new_row

    ids = _ids(2, 16, seed=12)
    ids[0, 5] = mask_id  # MASK as an input token is an ordinary embedding row
    pos = _positions(2, 16)
    with torch.no_grad():
        a, b = twin(ids, pos), ours(ids, pos)
    assert torch.isneginf(b[..., mask_id]).all()
    assert torch.isfinite(a[..., mask_id]).all()
    keep = torch.arange(VOCAB) != mask_id
    assert_close(b[..., keep], a[..., keep], rtol=0, atol=0)
