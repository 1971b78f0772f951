"""The Python forward's attention (``kernels.attend``) is row-stable: a row's output does not depend on
what else is in the call.

This is what makes a request's output independent of its batch, of how its prompt was chunked and
of where its K/V live. Every check is ``torch.equal`` (bit for bit), in bf16 and fp32: idlm's native
attention, and PyTorch's kernels one query row per call (the fallback ``rowcheck`` switches to).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from idlm.model import kernels, native
from idlm.model.attention import KEY_BLOCK, attend_torch, padded_keys, prefix_window_bias

from .test_window_exact import _shaped_like_smollm2

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


def _attend(impl: str):
    if impl == "native":
        if not native.load():
            pytest.skip(f"native code unavailable: {native.why()}")
        return lambda q, k, v, bias: kernels.attend(q, k, v, bias)

    def by_row(q, k, v, bias):
        with kernels.pytorch_kernels():
            return kernels.attend(q, k, v, bias, by_row=True)
    return by_row


def _one_row(attend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int) -> torch.Tensor:
    """Row q (Hkv, G, D) alone over keys [0, n), from a fresh buffer with junk after n."""
    hkv, _, d = q.shape
    s = padded_keys(n)
    kk = torch.zeros(hkv, 1, s + KEY_BLOCK, d, dtype=k.dtype)
    vv = torch.full((hkv, 1, s + KEY_BLOCK, d), 3.0, dtype=v.dtype)  # junk past n must not matter
    kk[:, 0, :n], vv[:, 0, :n] = k[:, :n], v[:, :n]
    bias = torch.full((1, 1, s), float("-inf"))
    bias[..., :n] = 0
    return attend(q[:, None, :, None], kk[:, :, :s], vv[:, :, :s], bias)[:, 0, :, 0]  # strided views


@pytest.mark.parametrize("impl", ["native", "pytorch-by-row"])
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@torch.inference_mode()
def test_rows_of_a_ragged_batch_equal_rows_alone(dtype: torch.dtype, impl: str) -> None:
    attend = _attend(impl)
    g = torch.Generator().manual_seed(0)
    hkv, grp, d = 3, 3, 64
    checked = 0
    for trial in range(12):
        r = int(torch.randint(1, 9, (1,), generator=g))
        rows = torch.randint(1, 300 if trial % 4 == 0 else 12, (r,), generator=g).tolist()
        starts = torch.randint(0, 1400, (r,), generator=g).tolist()
        s = padded_keys(max(a + t for a, t in zip(starts, rows)))
        t_max = max(rows)
        k = torch.randn(hkv, r, s, d, generator=g).to(dtype)
        v = torch.randn(hkv, r, s, d, generator=g).to(dtype)
        q = torch.randn(hkv, r, grp, t_max, d, generator=g).to(dtype)
        win = torch.zeros(r, t_max, t_max, dtype=torch.bool)
        for i, t in enumerate(rows):
            win[i, :t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
            win[i, t:, 0] = True  # padding rows see one key
        out = attend(q, k, v, prefix_window_bias(torch.tensor(starts), win, s))
        for i, t in enumerate(rows):
            for row in sorted({0, t // 2, t - 1}):
                alone = _one_row(attend, q[:, i, :, row], k[:, i], v[:, i], starts[i] + row + 1)
                assert torch.equal(alone, out[:, i, :, row]), f"trial {trial} seq {i} row {row}"
                checked += 1
    assert checked > 60


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@torch.inference_mode()
def test_native_attention_matches_pytorch(dtype: torch.dtype) -> None:
    """Both attentions compute softmax(q kᵀ / √D) v over the visible keys: equal to fp32 rounding."""
    if not native.load():
        pytest.skip(f"native code unavailable: {native.why()}")
    g = torch.Generator().manual_seed(5)
    hkv, r, grp, t, d = 2, 3, 2, 5, 64
    s = padded_keys(300)
    q = torch.randn(hkv, r, grp, t, d, generator=g).to(dtype)
    k, v = (torch.randn(hkv, r, s, d, generator=g).to(dtype) for _ in range(2))
    win = torch.ones(r, t, t, dtype=torch.bool).tril()
    bias = prefix_window_bias(torch.tensor([10, 200, 290]), win, s)
    ref = attend_torch(q.double(), k.double(), v.double(), bias.double())
    assert (kernels.attend(q, k, v, bias).double() - ref).abs().max() < 1e-5


def test_bias_marks_prefix_window_and_padding() -> None:
    win = torch.tensor([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], dtype=torch.bool)  # a branch row skips slot 1
    bias = prefix_window_bias(torch.tensor([2]), win, KEY_BLOCK)
    seen = (bias[0] == 0).int()
    assert seen[:, :6].tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0]]
    assert not seen[:, 6:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@torch.inference_mode()
def test_chunked_long_prefill_equals_one_prefill(dtype: torch.dtype) -> None:
    """A 1,100-token prompt in one forward, in chunks of 256 / 97, or token by token at the end:
    the same K/V and the same last-row logits, bit for bit (past the old kernels' ~1k-key limit)."""
    model = _shaped_like_smollm2(dtype)
    g = torch.Generator().manual_seed(3)
    n = 1100
    ids = torch.randint(0, 512, (n,), generator=g)
    pos = torch.arange(n)
    ref = model.new_cache(capacity=1280)
    last = model.logits(model.hidden(ids, pos, ref)[:, -1:])
    for cuts in ([0, 256, 512, 768, 1024, n], [0, 97, 500, 1000, n], [0, 1090] + list(range(1091, n + 1))):
        c = model.new_cache(capacity=1280)
        for a, b in itertools.pairwise(cuts):
            h = model.hidden(ids[a:b], pos[a:b], c)
        assert torch.equal(model.logits(h[:, -1:]), last), f"cuts {cuts[:4]}"
        assert torch.equal(c.k[..., :n, :], ref.k[..., :n, :]) and torch.equal(c.v[..., :n, :], ref.v[..., :n, :])
