"""Shared fixtures for the training tests: a tiny random Llama saved in HF layout, loaded with our
loader (MASK = appended row 128), and a toy self-distillation data file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from idlm.model import load_folder

VOCAB = 128


def make_tiny_folder(path: Path, seed: int = 0, tie: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    conf = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=VOCAB, intermediate_size=128, max_position_embeddings=512,
                       tie_word_embeddings=tie, initializer_range=0.2)
    LlamaForCausalLM(conf).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_model(tiny_folder):
    return load_folder(tiny_folder)


def toy_records(n: int = 8, seed: int = 0) -> list[dict]:
    """Prompts of random tokens; responses count upwards from a prompt-dependent start (learnable)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randrange(3, 9))]
        start = prompt[-1] % 50
        response = [3 + (start + j) % 120 for j in range(rng.randrange(12, 20))] + [2]
        out.append({"key": str(i), "prompt_ids": prompt, "response_ids": response})
    return out


@pytest.fixture
def toy_data(tmp_path) -> Path:
    path = tmp_path / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_records()))
    return path
