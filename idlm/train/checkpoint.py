"""Saving and loading converted models.

An output directory holds ``idlm_convert.json`` (``ConvertedMeta``) and either

* ``adapter.safetensors`` (mode lora): the gated LoRA tensors + the MASK row; the base model is
  loaded by name and the adapter is applied with the gate on MASK positions only, or
* an HF-layout model (mode full): ``config.json`` (the base config plus ``mask_token_id``),
  ``model.safetensors`` and the tokenizer files, so ``load_model(out_dir)`` also works directly.

Every file is written to a temporary name and moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from ..model.config import ModelConfig
from ..model.converted import ADAPTER_FILE, META_FILE, ConvertedMeta
from ..model.decoder import Decoder
from ..model.loading import LoadedConverted, load_converted, read_config  # noqa: F401 (re-exported by idlm.train)
from ..model.lora import lora_state_dict, lora_state_from

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "tokenizer.model", "vocab.json", "merges.txt",
                   "generation_config.json")


def _atomic_write_bytes(path: Path, writer) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    writer(tmp)
    os.chmod(tmp, 0o644)  # safetensors creates files 0600
    os.replace(tmp, path)


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write_bytes(path, lambda tmp: save_file(tensors, str(tmp)))


def save_json(obj: dict, path: Path) -> None:
    _atomic_write_bytes(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_converted(model: Decoder, out_dir: str | Path, meta: ConvertedMeta, base_folder: Path,
                   state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter (lora) or the full HF-layout model (full) plus ``idlm_convert.json``.
    ``state``: the Decoder's tensors when ``model`` itself is sharded (FSDP gathers them on rank 0; for
    lora the trainable ones only)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if meta.mode == "lora":
        adapter = lora_state_dict(model) if state is None else lora_state_from(state, meta.lora_alpha)
        save_safetensors(adapter, out / ADAPTER_FILE)
    else:
        conf = read_config(base_folder)
        conf["mask_token_id"] = model.cfg.mask_token_id
        sd = model.state_dict() if state is None else state
        save_safetensors(ours_to_hf(sd, model.cfg), out / "model.safetensors")
        save_json(conf, out / "config.json")
        if base_folder.resolve() != out.resolve():
            copy_tokenizer_files(base_folder, out)
    save_json(asdict(meta), out / META_FILE)
    return out


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files ``src`` has into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            _atomic_write_bytes(dst / name, lambda tmp, f=src / name: shutil.copyfile(f, tmp))
            copied.append(name)
    return copied


def ours_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our fused decoder state dict → HF Llama/Qwen names (inverse of ``loading.hf_to_ours``).
    The embedding keeps an appended MASK row, so it may have vocab_size + 1 rows."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        a, m = h + "self_attn.", h + "mlp."
        out[h + "input_layernorm.weight"] = sd[o + "ln1.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[o + "ln2.weight"]
        for suffix in ("weight", "bias"):
            if o + "qkv." + suffix in sd:
                parts = sd[o + "qkv." + suffix].split([cfg.q_size, cfg.kv_size, cfg.kv_size], 0)
                out.update({a + f"{x}_proj.{suffix}": t for x, t in zip("qkv", parts)})
            if o + "o." + suffix in sd:
                out[a + f"o_proj.{suffix}"] = sd[o + "o." + suffix]
            if o + "gate_up." + suffix in sd:
                g, u = sd[o + "gate_up." + suffix].chunk(2, 0)
                out[m + f"gate_proj.{suffix}"], out[m + f"up_proj.{suffix}"] = g, u
            if o + "down." + suffix in sd:
                out[m + f"down_proj.{suffix}"] = sd[o + "down." + suffix]
        if cfg.qk_norm:
            out[a + "q_norm.weight"] = sd[o + "q_norm.weight"]
            out[a + "k_norm.weight"] = sd[o + "k_norm.weight"]
    return out


