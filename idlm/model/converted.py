"""Converted I-DLM checkpoints: the small JSON that describes them and loading for inference.

A converted model is a folder with ``idlm_convert.json`` and either an HF-layout model (``full`` mode:
all weights trained) or ``adapter.safetensors`` (``lora`` mode: R-ISD gated LoRA over a base model
named in the JSON). Written by ``idlm.train.checkpoint``; read here so inference never imports training;
``loading.load_converted`` loads one (the base model first, in lora mode).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .decoder import Decoder

META_FILE = "idlm_convert.json"
ADAPTER_FILE = "adapter.safetensors"


@dataclass(frozen=True)
class ConvertedMeta:
    """Small JSON description of a converted model."""

    base_model: str  # what load_model() should load as the base (name, folder or hub id)
    mode: str  # full | lora
    mask_token_id: int  # MASK input id
    block_size: int  # training block size B of the last stage (MASKs per block)
    stride: int  # ISD stride N = B + 1 it was trained for
    steps: int  # optimizer steps trained
    lora_rank: int = 0  # LoRA rank (lora mode)
    lora_alpha: float = 0.0  # LoRA alpha (lora mode)
    lora_targets: tuple[str, ...] = ()  # adapted projections (lora mode)
    attention: str = "causal"  # noisy-half training mask: causal (I-DLM) | bidirectional-block (SDAR baseline)
    format_version: int = 1

    @classmethod
    def read(cls, folder: Path) -> ConvertedMeta:
        d = json.loads((folder / META_FILE).read_text())
        d["lora_targets"] = tuple(d.get("lora_targets", ()))
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def apply_adapter(model: Decoder, folder: Path, meta: ConvertedMeta, device: str = "cpu") -> None:
    """Wrap ``model`` (the base named in ``meta``, already loaded) with the folder's gated LoRA adapter."""
    from safetensors.torch import load_file

    from .lora import load_lora

    if model.cfg.mask_token_id != meta.mask_token_id:
        raise ValueError(f"{folder}: adapter was trained with MASK id {meta.mask_token_id}, base model uses "
                         f"{model.cfg.mask_token_id}")
    state = {k: v.to(device=device) for k, v in load_file(str(folder / ADAPTER_FILE)).items()}
    load_lora(model, state, meta.lora_alpha)
