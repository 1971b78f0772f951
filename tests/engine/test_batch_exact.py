"""Batch invariance to the last bit: every window the engine computes in a mixed batch has the same
logits, ``torch.equal``, as that window computed alone by the batch-1 cache path after a one-shot
prefill of the same committed text.

Token-level tests on tiny models cannot see last-bit drift (they have no near-ties), so this compares
raw logits on layers shaped like SmolLM2-135M's (the default model), with an R-ISD adapter, prompts
long enough to cross attention key blocks and to be chunked, AR and ISD windows (cold, verify,
fallback branches) side by side, in bf16 and fp32.
"""

from __future__ import annotations

import pytest
import torch

from idlm.config import DecodeConfig, SamplingParams
from idlm.engine import EngineConfig, LLMEngine
from idlm.model.lora import add_lora
from idlm.model.quant import quantize_model

from ..model.test_window_exact import _shaped_like_smollm2

CFGS = [DecodeConfig(stride=3, fallback=True), DecodeConfig(mode="ar"), DecodeConfig(stride=4, fallback=False),
        DecodeConfig(stride=2, fallback=True), DecodeConfig(stride=5, fallback=True), DecodeConfig(stride=3, tree=2)]
LENGTHS = [5, 130, 300, 700, 17, 64]


@pytest.mark.parametrize(("dtype", "quant"), [(torch.float32, "none"), (torch.bfloat16, "none"),
                                              (torch.bfloat16, "int4"), (torch.bfloat16, "int8"),
                                              (torch.bfloat16, "w4a8")],
                         ids=["fp32", "bf16", "bf16-int4", "bf16-int8", "bf16-w4a8"])
def test_every_batched_window_equals_the_window_alone(dtype: torch.dtype, quant: str) -> None:
    model = _shaped_like_smollm2(dtype)
    add_lora(model, rank=8, alpha=16.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(dtype) * 0.05)
    model.requires_grad_(False)
    if quant == "w4a8":
        from idlm.model.quant import uses_idlm_kernel

        if not uses_idlm_kernel("int8"):
            pytest.skip("int8 activations need AVX-512 VNNI")
    if quant != "none":  # the weight-only kernels under the dense gated LoRA
        assert quantize_model(model, quant).dense == []
    with torch.inference_mode():
        _check(model, g)


def _check(model, g: torch.Generator) -> None:
    eng = LLMEngine(model, EngineConfig(num_blocks=300, block_size=16, max_running=6, max_batched_tokens=256))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for n, cfg in zip(LENGTHS, CFGS):
        eng.add_request(torch.randint(0, 512, (n,), generator=g).tolist(), params, cfg)

    captured = []  # (request, start, window, logits) of every decode item
    run = eng.runner.run

    def spy(items, stationary=False):
        res = run(items, stationary)
        for it, lg in zip(items, res.rows):
            if it.window is not None:
                r = it.request
                text = r.committed_tokens(0, it.start)
                captured.append((text, it.start, it.window, lg.clone()))
        return res

    eng.runner.run = spy
    for _ in range(12):
        eng.step()
    kinds = {(w.n_specs > 0, w.n_drafts, w.mask is not None) for _, _, w, _ in captured}
    assert len(captured) > 40 and len(kinds) >= 6  # AR, cold, verify, fallback windows all ran
    for text, start, win, logits in captured:
        assert len(text) == start
        cache = model.new_cache(capacity=1024)
        model.hidden(torch.tensor(text), torch.arange(start), cache)
        h = model.hidden(torch.tensor(win.ids), start + torch.tensor(win.offsets), cache,
                         gate=win.gate() if win.n_drafts else None, window_mask=win.mask)[0]
        alone = model.logits(h[: win.used])
        assert torch.equal(alone, logits), f"window {win.n_specs} specs / {win.n_drafts} drafts at {start}"
