"""Loading: config parsing (MASK id, RoPE spellings), checkpoint layouts, and clear errors.

Fast tests use tiny random checkpoints and hand-written config / GGUF files; nothing touches the
network. The ``slow`` test loads the real embedded default model (SmolLM2-135M-Instruct GGUF),
checks it against transformers and that it answers a factual chat question.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from idlm.config import cache_dir
from idlm.model import ModelConfig, ModelLoadError, UnsupportedModelError, load_folder, load_model, loading
from idlm.model.config import QWEN_MASK_TOKEN_ID, resolve_mask_token_id
from idlm.model.rope import inv_freq_and_scale

VOCAB = 200


def _ids(t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, t), generator=torch.Generator().manual_seed(seed))


def _hf_dict(model_type: str = "llama", **kw) -> dict:
    d = {"model_type": model_type, "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    d.update(kw)
    return d


def _rewrite_config(folder: Path, **changes) -> None:
    conf = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            conf.pop(k, None)
        else:
            conf[k] = v
    (folder / "config.json").write_text(json.dumps(conf))


# --------------------------------------------------------------------------------------------
# Config parsing


@pytest.mark.parametrize(("family", "vocab", "explicit", "expected"), [
    ("llama", 200, None, 200),  # non-Qwen: appended row
    ("llama", 151936, None, 151936),  # a big non-Qwen vocabulary still appends
    ("qwen2", 151936, None, QWEN_MASK_TOKEN_ID),
    ("qwen3", 151936, None, QWEN_MASK_TOKEN_ID),
    ("qwen3", 200, None, 200),  # a small Qwen-family vocabulary has no <|MASK|> slot
    ("qwen3", 151936, 7, 7),  # explicit id wins
])
def test_resolve_mask_token_id(family: str, vocab: int, explicit: int | None, expected: int) -> None:
    assert resolve_mask_token_id(family, vocab, explicit) == expected


def test_config_mask_id_sources() -> None:
    cfg = ModelConfig.from_hf(_hf_dict())
    assert (cfg.mask_token_id, cfg.num_embeddings, cfg.mask_is_new_row) == (VOCAB, VOCAB + 1, True)
    cfg = ModelConfig.from_hf(_hf_dict(), mask_token_id=9)
    assert (cfg.mask_token_id, cfg.num_embeddings, cfg.mask_is_new_row) == (9, VOCAB, False)
    # an id stored in config.json (converted I-DLM) beats the caller's default
    cfg = ModelConfig.from_hf(_hf_dict("sdar", mask_token_id=11, head_dim=16), mask_token_id=9)
    assert (cfg.model_type, cfg.mask_token_id, cfg.qk_norm) == ("qwen3", 11, True)
    big = ModelConfig.from_hf(_hf_dict("qwen3", vocab_size=151936, head_dim=16))
    assert big.mask_token_id == QWEN_MASK_TOKEN_ID and big.num_embeddings == 151936


def test_config_fields() -> None:
    cfg = ModelConfig.from_hf(_hf_dict("qwen2", eos_token_id=[3, 4], rms_norm_eps=1e-5, tie_word_embeddings=True))
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.eos_token_ids, cfg.rms_eps) == (16, 2, (3, 4), 1e-5)
    assert cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias and cfg.tie_embeddings and not cfg.qk_norm
    cfg = ModelConfig.from_hf(_hf_dict("llama", attention_bias=True, mlp_bias=True, eos_token_id=2))
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias and cfg.eos_token_ids == (2,) and not cfg.tie_embeddings
    no_kv = dict(_hf_dict())
    del no_kv["num_key_value_heads"]
    assert ModelConfig.from_hf(no_kv).num_kv_heads == 4


@pytest.mark.parametrize(("conf", "theta", "rope_type"), [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}, 5e5, None),  # transformers 5
    ({"rope_theta": 5e5, "rope_scaling": None}, 5e5, None),  # transformers 4, no scaling
    ({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}, 5e5, "linear"),  # old "type" key
    ({"rope_theta": 1e6, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                          "original_max_position_embeddings": 64}}, 1e6, "yarn"),
    ({}, 10000.0, None),
])
def test_rope_config_spellings(conf: dict, theta: float, rope_type: str | None) -> None:
    cfg = ModelConfig.from_hf(_hf_dict(**conf))
    assert cfg.rope_theta == theta
    assert (cfg.rope_scaling or {}).get("rope_type") == rope_type
    assert "type" not in (cfg.rope_scaling or {})


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},  # orig defaulted
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0},  # orig defaulted to max_position_embeddings
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32, "mscale": 1.0,
     "mscale_all_dim": 0.5, "beta_fast": 8, "beta_slow": 0.5},
])
def test_inv_freq_matches_transformers(rope: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    d = _hf_dict(max_position_embeddings=128, rope_scaling=dict(rope), rope_theta=10000.0)
    ours, our_scale = inv_freq_and_scale(ModelConfig.from_hf(d))
    hf_cfg = LlamaConfig(**{k: v for k, v in d.items() if k not in ("model_type", "rope_scaling", "rope_theta")},
                         rope_parameters={"rope_theta": 10000.0, **rope})
    ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg, "cpu")
    assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert our_scale == pytest.approx(ref_scale, rel=1e-6)
    base, _ = inv_freq_and_scale(ModelConfig.from_hf(_hf_dict(max_position_embeddings=128)))
    assert not torch.allclose(ours, base)  # the variant really rescales something


@pytest.mark.parametrize(("conf", "match"), [
    (_hf_dict("gpt2"), "gpt2"),
    (_hf_dict("mistral"), "mistral"),
    (_hf_dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "longrope"),
    (_hf_dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}), "dynamic"),
    (_hf_dict("qwen2", use_sliding_window=True, sliding_window=64), "sliding"),
    (_hf_dict(num_key_value_heads=3), "multiple"),
])
def test_unsupported_configs(conf: dict, match: str) -> None:
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf(conf)


# --------------------------------------------------------------------------------------------
# Checkpoint layouts


@torch.no_grad()
def test_appended_mask_row(tiny_checkpoint) -> None:
    """Non-Qwen vocabularies get MASK as a new embedding row (mean embedding) that is never scored."""
    from safetensors.torch import load_file

    for tie in (False, True):
        folder = tiny_checkpoint("llama", tie_word_embeddings=tie)
        emb = load_file(str(folder / "model.safetensors"))["model.embed_tokens.weight"]
        m = load_folder(folder)
        assert m.cfg.mask_token_id == VOCAB and m.embed.weight.shape == (VOCAB + 1, 64)
        assert_close(m.embed.weight[:VOCAB], emb, rtol=0, atol=0)
        assert_close(m.embed.weight[VOCAB], emb.mean(0))
        assert m.head_weight().shape == (VOCAB, 64)
        ids = _ids(8)
        ids[0, 3] = m.cfg.mask_token_id  # MASK is a valid *input*
        out = m(ids, torch.arange(8)[None])
        assert out.shape == (1, 8, VOCAB) and torch.isfinite(out).all()


@torch.no_grad()
def test_in_vocab_mask_override(tiny_llama) -> None:
    m = load_folder(tiny_llama, mask_token_id=5)
    base = load_folder(tiny_llama)
    assert m.cfg.mask_token_id == 5 and m.embed.weight.shape[0] == VOCAB
    ids, pos = _ids(6, seed=1), torch.arange(6)[None]
    out, ref = m(ids, pos), base(ids, pos)
    assert torch.isneginf(out[..., 5]).all() and torch.isfinite(ref[..., 5]).all()
    keep = torch.arange(VOCAB) != 5
    assert_close(out[..., keep], ref[..., keep], rtol=0, atol=0)


@torch.no_grad()
def test_legacy_rope_spelling_loads_identically(tiny_checkpoint) -> None:
    """A transformers-4 config.json (rope_theta + rope_scaling with "type") gives the same model."""
    new = tiny_checkpoint("llama", name="new", rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                 "rope_theta": 50000.0})
    old = new.parent / "old"
    shutil.copytree(new, old)
    _rewrite_config(old, rope_parameters=None, rope_theta=50000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert "rope_parameters" not in json.loads((old / "config.json").read_text())
    ids, pos = _ids(10, seed=2), torch.arange(100, 110)[None]
    assert_close(load_folder(old)(ids, pos), load_folder(new)(ids, pos), rtol=0, atol=0)


@torch.no_grad()
def test_sharded_checkpoint_and_ignored_adapter(tiny_checkpoint, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    single = tiny_checkpoint("qwen2", name="single")
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(single), dtype=torch.float32).save_pretrained(
        str(sharded), max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    ids, pos = _ids(7, seed=3), torch.arange(7)[None]
    assert_close(load_folder(sharded)(ids, pos), load_folder(single)(ids, pos), rtol=0, atol=0)
    # an adapter file next to a single-file checkpoint is not read as base weights
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(VOCAB, 64)}, str(single / "adapter_model.safetensors"))
    assert_close(load_folder(single)(ids, pos), load_folder(sharded)(ids, pos), rtol=0, atol=0)


@torch.no_grad()
def test_bf16_load(tiny_qwen3) -> None:
    ref = load_folder(tiny_qwen3)
    m = load_folder(tiny_qwen3, dtype=torch.bfloat16)
    assert m.dtype == torch.bfloat16 and m.new_cache().k.dtype == torch.bfloat16
    ids, pos = _ids(12, seed=4), torch.arange(12)[None]
    out, want = m(ids, pos), ref(ids, pos)
    assert out.dtype == torch.float32
    corr = torch.corrcoef(torch.stack([out.flatten(), want.flatten()]))[0, 1]
    assert corr > 0.99


# --------------------------------------------------------------------------------------------
# Errors


def test_missing_paths_raise_model_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_hub(*a, **k):  # the hub must not be contacted for things that are clearly paths
        raise AssertionError("hub contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    missing = tmp_path / "does-not-exist"
    for name in (str(missing), "./nope", "~/nope-idlm-model", "no-such-model", "a/b/c"):
        with pytest.raises(ModelLoadError, match="not found"):
            load_model(name)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_folder(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        loading.resolve_folder(str(empty))


def test_hub_failure_is_model_load_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = []

    def offline(repo_id, **k):
        calls.append(repo_id)
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="hub download failed"):
        load_model("someone/some-model")
    assert calls == ["someone/some-model"]


def test_bad_folders(tiny_checkpoint, tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                   "vocab_size": 100, "n_embd": 64}))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(str(gpt2))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_folder(gpt2)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(broken))

    folder = tiny_checkpoint("llama")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(folder / "config.json", no_weights / "config.json")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(str(no_weights))

    # a checkpoint missing a tensor: named in the error
    from safetensors.torch import load_file, save_file

    sd = load_file(str(folder / "model.safetensors"))
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="layers.1.self_attn.k_proj"):
        load_model(str(folder))


def _write_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_gguf_is_rejected_before_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    cache = tmp_path / "cache"
    monkeypatch.setenv("IDLM_CACHE", str(cache))

    def no_convert(*a, **k):
        raise AssertionError("conversion attempted")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_convert)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_convert)

    d = tmp_path / "g"
    d.mkdir()
    path = _write_gguf(d / "tiny-gpt2.gguf", "gpt2")
    assert loading.gguf_architecture(path) == "gpt2"
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'gpt2'"):
        loading.gguf_to_folder(path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        loading.resolve_folder(str(path))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        loading.resolve_folder(str(d))  # a folder holding exactly one .gguf
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(str(path))
    assert not cache.exists() or not any(cache.iterdir())

    # a supported architecture name is read correctly too (conversion itself is covered by the slow test)
    assert loading.gguf_architecture(_write_gguf(tmp_path / "tiny-llama.gguf", "llama")) == "llama"

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        loading.gguf_to_folder(garbage)


# --------------------------------------------------------------------------------------------
# The real default model


@pytest.mark.slow
@torch.no_grad()
def test_default_model_answers_and_matches_transformers() -> None:
    from transformers import LlamaForCausalLM

    lm = load_model(loading.DEFAULT_MODEL)  # the bare base model (None = base + shipped R-ISD adapter)
    assert lm.name == loading.DEFAULT_MODEL and lm.meta is None
    assert (lm.folder / "config.json").exists() and lm.folder.is_relative_to(cache_dir())
    model, cfg = lm.model, lm.model.cfg
    assert cfg.model_type == "llama" and cfg.mask_is_new_row and cfg.mask_token_id == cfg.vocab_size

    tok = lm.tokenizer()
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = enc["input_ids"] if not isinstance(enc, torch.Tensor) else enc
    ids = ids.reshape(1, -1)
    t = ids.shape[1]

    # logits parity with transformers on the prompt
    hf = LlamaForCausalLM.from_pretrained(str(lm.folder), dtype=torch.float32).eval()
    ref = hf(input_ids=ids, use_cache=False).logits.float()
    ours = model(ids, torch.arange(t)[None])
    assert ours.shape == ref.shape
    assert_close(ours, ref, rtol=1e-3, atol=2e-3)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))

    # greedy answer with our KV cache
    cache = model.new_cache()
    logits = model(ids, torch.arange(t)[None], cache=cache)[:, -1]
    out: list[int] = []
    eos = set(cfg.eos_token_ids) | ({tok.eos_token_id} if tok.eos_token_id is not None else set())
    for _ in range(24):
        nxt = int(logits.argmax(-1))
        if nxt in eos:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), torch.tensor([[t + len(out) - 1]]), cache=cache)[:, -1]
    text = tok.decode(out, skip_special_tokens=True)
    assert "Paris" in text, text

    # and transformers' own greedy decode agrees token for token
    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(out), do_sample=False)
    assert gen[0, t:].tolist()[: len(out)] == out
