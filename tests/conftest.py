"""Shared pytest setup: CPU thread count, quiet transformers, and tiny random HF checkpoints.

``tiny_checkpoint(family, **config_overrides)`` writes a randomly initialised transformers model
(Llama / Qwen2 / Qwen3) with safetensors weights into a fresh temporary folder and returns the
folder. Weights, biases and norm scales are all re-drawn away from HF's near-zero / all-ones init
so that every parameter (including biases and RMSNorm weights) actually changes the logits.
``tiny_llama`` and ``tiny_qwen3`` are session-wide ready-made checkpoints for tests that only need
"some small model".
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

torch.set_num_threads(2)

TINY_VOCAB = 200
TINY_DIMS: dict[str, Any] = {
    "vocab_size": TINY_VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def _config_class(family: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    return {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: N(0, 0.1) for matrices and biases, 1 + N(0, 0.2) for norm scales."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif "embed" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(0.1 * noise)


def write_tiny_checkpoint(folder: Path, family: str = "llama", seed: int = 0, **overrides: Any) -> Path:
    """Save a random tiny ``family`` model (fp32, safetensors) to ``folder`` and return it."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = _config_class(family)(**{**TINY_DIMS, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def load_hf(folder: Path):
    """The transformers reference model for ``folder``: fp32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32,
                                                attn_implementation="eager").eval()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``tiny_checkpoint(family, name=..., seed=..., **config_overrides) -> folder``."""
    counter = iter(range(1_000_000))

    def make(family: str = "llama", name: str | None = None, seed: int = 0, **overrides: Any) -> Path:
        return write_tiny_checkpoint(tmp_path / (name or f"{family}-{next(counter)}"), family, seed, **overrides)

    return make


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny untied Llama checkpoint (vocab 200, MASK is the appended id 200)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide tiny Qwen3 checkpoint (q/k norm, tied embeddings)."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), "qwen3", seed=2, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def hf_reference() -> Callable[[Path], torch.nn.Module]:
    """Function ``folder -> transformers model`` (fp32, eager attention, eval) used as the reference."""
    return load_hf
