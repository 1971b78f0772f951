"""The load-time row-stability check (``idlm.model.rowcheck``): it covers every inference path of a model,
catches a kernel that rounds a row differently in a batch, and its fallback keeps greedy ISD == AR."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from idlm.config import DecodeConfig, SamplingParams
from idlm.decode import ar_generate, isd_generate
from idlm.model import kernels, rowcheck
from idlm.model.decoder import Proj
from idlm.model.lora import add_lora
from idlm.model.quant import quantize_model

from ..decode.tiny import tiny_model
from .test_window_exact import _shaped_like_smollm2


class UnstableProj(Proj):
    """A projection whose rounding depends on the row count, like a CPU kernel that picks its blocking by
    shape: one row is one dot product, several rows sum two halves of the input dimension."""

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        def mm(rows: torch.Tensor) -> torch.Tensor:
            if rows.shape[0] == 1:
                return F.linear(rows, self.weight, self.bias)
            h = self.in_features // 2
            return F.linear(rows[:, :h], self.weight[:, :h]) + F.linear(rows[:, h:], self.weight[:, h:], self.bias)
        flat = x.reshape(-1, self.in_features)
        y = kernels.per_row(mm, flat) if self.by_row else mm(flat)
        return y.view(*x.shape[:-1], self.out_features)


def _inject(model) -> None:
    """Every layer's down projection becomes an UnstableProj with the same weights."""
    for layer in model.layers:
        old = layer.down
        new = UnstableProj(old.in_features, old.out_features, bias=old.bias is not None)
        new.load_state_dict(old.state_dict())
        layer.down = new.requires_grad_(False)


@torch.inference_mode()
def _window_equals_steps(model, prefix: int = 7, t: int = 5) -> bool:
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, model.cfg.vocab_size, (prefix + t,), generator=g)
    pos = torch.arange(prefix + t)
    steps, win = model.new_cache(capacity=64), model.new_cache(capacity=64)
    for c in (steps, win):
        model.hidden(ids[:prefix], pos[:prefix], c)
    one = torch.cat([model.logits(model.hidden(ids[i:i + 1], pos[i:i + 1], steps)) for i in range(prefix, prefix + t)], 1)
    return torch.equal(one, model.logits(model.hidden(ids[prefix:], pos[prefix:], win)))


def test_row_counts_cover_windows_tiles_and_the_maximum() -> None:
    assert rowcheck.row_counts(20) == list(range(1, 18)) + [20]
    assert rowcheck.row_counts(512) == list(range(1, 18)) + [33, 65, 129, 257, 512]


def test_every_path_of_an_adapted_quantized_model_is_checked_and_stable() -> None:
    model = _shaped_like_smollm2(torch.bfloat16)
    add_lora(model, rank=16, alpha=32.0)
    model.requires_grad_(False)
    quantize_model(model, "w4a8")
    result = rowcheck.check(model, max_rows=40)
    names = [r.name for r in result.results]
    assert names == ["qkv + adapter", "o + adapter", "gate_up + adapter", "down + adapter", "head",
                     "native forward", "attention"]
    assert result.all_stable and "rows exact" in result.summary()
    assert all("idlm" in r.kernel or "native" in r.kernel for r in result.results)


def test_an_unstable_kernel_is_caught_and_its_fallback_keeps_isd_equal_to_ar() -> None:
    model = tiny_model(seed=4)  # fp32: the Python forward
    _inject(model)
    assert not _window_equals_steps(model)  # the injected kernel really breaks exactness
    result = rowcheck.check(model, max_rows=40)
    bad = [r for r in result.results if not r.stable]
    assert [r.name for r in bad] == ["down"] and bad[0].first_bad == 2 and bad[0].fallback == "one row per call"
    assert "down" in result.summary() and "one row per call" in result.summary()
    assert all(layer.down.by_row for layer in model.layers)
    assert _window_equals_steps(model)
    params = SamplingParams(max_new_tokens=24)
    for stride in (2, 3, 4):
        for seed in range(3):
            prompt = torch.randint(0, 90, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
            ar = ar_generate(model, prompt, params).tokens
            assert isd_generate(model, prompt, DecodeConfig(stride=stride), params).tokens == ar


def test_pytorch_kernels_are_used_only_as_checked() -> None:
    """Without idlm's kernels (as without a C++ compiler), whatever this CPU's PyTorch kernels do, after
    the check a window equals one-token steps bit for bit."""
    for dtype in (torch.float32, torch.bfloat16):
        model = _shaped_like_smollm2(dtype)
        model.use_native(False)
        with kernels.pytorch_kernels():
            result = rowcheck.check(model, max_rows=40)
            assert all("pytorch" in r.kernel for r in result.results)
            assert _window_equals_steps(model, prefix=37, t=9), result.summary()
