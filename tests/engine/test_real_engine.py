"""The default model (SmolLM2-135M-Instruct with the shipped R-ISD drafter) through the engine: 16 chat
prompts with mixed modes in one batch, each output equal to the batch-1 AR decoder's (slow)."""

from __future__ import annotations

import pytest
import torch

from idlm.config import DecodeConfig, SamplingParams
from idlm.decode import ar_generate
from idlm.engine import EngineConfig, LLMEngine
from idlm.eval.prompts import BUILTIN_PROMPTS, encode
from idlm.model import load_model

MODES = [DecodeConfig(stride=3), DecodeConfig(mode="ar"), DecodeConfig(stride=2, fallback=True),
         DecodeConfig(stride=4, fallback=False), DecodeConfig(stride="auto"), DecodeConfig(stride=5)]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_sixteen_mixed_requests_equal_batch1_ar(dtype: torch.dtype) -> None:
    lm = load_model(None, dtype=dtype)
    tok = lm.tokenizer()
    prompts = [encode(tok, t, chat=True) for t in BUILTIN_PROMPTS]
    params = SamplingParams(max_new_tokens=96)
    eng = LLMEngine(lm.model, EngineConfig(max_running=16, max_batched_tokens=256))
    outs = eng.generate(prompts, params, [MODES[i % len(MODES)] for i in range(len(prompts))])
    for p, out in zip(prompts, outs):
        assert out.token_ids == ar_generate(lm.model, p, params).tokens
    assert eng.metrics.tpf > 1.2  # the drafter drafts for real in the batch
    assert eng.blocks.num_free == eng.blocks.num_total
