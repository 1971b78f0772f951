"""The native CPU forward (``idlm/model/native``): used where it should be, as accurate as the Python
forward, and exact in every batch layout (the bit-exactness tests of the engine and the window tests
run through it too, since they run in bf16; here the native path is checked explicitly).

On a machine where the extension cannot be built the Python forward runs and these tests skip,
except under CI (``CI=true``), where a missing native forward is a failure."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from idlm.model import Decoder, native
from idlm.model.decoder import PagedBatch, PagedKV
from idlm.model.lora import add_lora
from idlm.model.native import NativeRows
from idlm.model.quant import quantize_model

from ..decode.tiny import tiny_model
from .test_window_exact import _shaped_like_smollm2

if not native.load():
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(f"CI needs the native forward: {native.why()}")
    pytest.skip(f"native forward unavailable: {native.why()}", allow_module_level=True)


def _adapted(dtype: torch.dtype = torch.bfloat16, quant: str = "none", family: str = "llama"):
    """SmolLM2-shaped layers (or a tiny model of ``family``) with a random gated LoRA, optionally quantized."""
    model = _shaped_like_smollm2(dtype) if family == "smollm2" else tiny_model(seed=3, family=family).to(dtype)
    rank = 16 if family == "smollm2" else 4
    add_lora(model, rank=rank, alpha=2.0 * rank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(dtype) * 0.05)
    model.requires_grad_(False)
    if quant != "none":
        quantize_model(model, quant)
    return model


def test_bf16_inference_runs_natively_and_fp32_or_training_does_not() -> None:
    model = _shaped_like_smollm2(torch.bfloat16)
    assert model.runs_native and native.describe(model) == "native"
    with torch.enable_grad():
        assert model.native_plan() is None  # autograd needs the Python forward
    model.use_native(False)
    assert not model.runs_native and native.describe(model).startswith("python")
    fp32 = _shaped_like_smollm2(torch.float32)
    assert not fp32.runs_native and "bf16 only" in native.describe(fp32)


def test_idlm_native_0_turns_it_off() -> None:
    code = ("import torch; from idlm.model import native; from tests.model.test_window_exact import _shaped_like_smollm2;"
            "m = _shaped_like_smollm2(torch.bfloat16); print(m.runs_native, native.why())")
    env = dict(os.environ, IDLM_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False turned off (IDLM_NATIVE=0)"


def test_a_killed_build_leaves_no_lock_that_blocks_the_next(tmp_path) -> None:
    """torch's build lock is a file; a build killed midway leaves it, and torch then waits for it forever.
    idlm holds an OS lock (released when its holder dies) and removes such a file under it."""
    (tmp_path / "lock").write_text("")  # what a killed build leaves
    with native._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / ".idlm-build.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        holder.kill()  # a build killed while it holds the lock
        holder.wait(10)
        with native._build_lock(tmp_path):  # the kernel released it: no wait
            pass
    finally:
        holder.kill()


def test_a_failed_build_falls_back_to_the_python_forward(monkeypatch) -> None:
    saved = dict(native._state)
    try:
        native._state.clear()
        import torch.utils.cpp_extension as ext

        def broken(*a, **k):
            raise RuntimeError("Error building extension 'idlm_native': no compiler")

        monkeypatch.setattr(ext, "load", broken)
        assert native.load() is False
        assert "could not build the native forward" in native.why() and "no compiler" in native.why()
    finally:
        native._state.clear()
        native._state.update(saved)


def _kl(logits: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    lp, lr = logits.float().log_softmax(-1), ref.float().log_softmax(-1)
    return (lr.exp() * (lr - lp)).sum(-1)


def _prefill_and_window(model, ids: torch.Tensor, prefix: int, mask: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    cache = model.new_cache(capacity=256)
    h1 = model.hidden(ids[:prefix], torch.arange(prefix), cache)[0]
    w = mask.shape[0]
    h2 = model.hidden(ids[prefix:prefix + w], prefix + torch.arange(w), cache, gate=gate, window_mask=mask)[0]
    return torch.cat([model.logits(h1), model.logits(h2)])


@pytest.mark.parametrize(("family", "quant"), [("smollm2", "none"), ("smollm2", "int4"), ("smollm2", "int8"),
                                               ("qwen3", "none"), ("qwen2", "none")])
@torch.inference_mode()
def test_native_is_as_accurate_as_the_python_forward(family: str, quant: str) -> None:
    """Both bf16 forwards against the fp32 Python forward of the same weights: the native one's mean KL
    is within 1.5x the Python one's (they round differently, neither is the reference)."""
    if family == "qwen2":  # q/k/v biases
        base = tiny_model(seed=3, family="qwen2")
        model = Decoder(dataclasses.replace(base.cfg, qkv_bias=True))
        model.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            for layer in model.layers:
                layer.qkv.bias.copy_(torch.randn(layer.qkv.bias.shape) * 0.5)
        model = model.eval().to(torch.bfloat16)
        add_lora(model, rank=4, alpha=8.0)
        model.requires_grad_(False)
    else:
        model = _adapted(torch.bfloat16, quant, family)
    vocab = model.cfg.vocab_size
    g = torch.Generator().manual_seed(5)
    prefix, w = 140, 6
    ids = torch.randint(0, vocab, (prefix + w,), generator=g)
    mask = torch.ones(w, w, dtype=torch.bool).tril()
    mask[4, 2] = False  # a fallback-like row that skips a slot
    gate = torch.tensor([0.0, 1, 1, 0, 1, 1])
    model.use_native(False)
    py = _prefill_and_window(model, ids, prefix, mask, gate)
    model.use_native(True)
    assert model.runs_native
    nat = _prefill_and_window(model, ids, prefix, mask, gate)
    if quant == "none":  # the reference: the same weights in fp32, Python forward
        ref = _prefill_and_window(model.float(), ids, prefix, mask, gate)
    else:  # quantized: no fp32 copy of the kernel's weights, so compare the two bf16 forwards directly
        ref = py
    assert torch.isfinite(nat).all()
    if ref is py:
        assert _kl(nat, py).mean() < 2e-3
        assert (nat.argmax(-1) == py.argmax(-1)).float().mean() > 0.9
    else:
        assert _kl(nat, ref).mean() <= 1.5 * _kl(py, ref).mean() + 1e-5


@torch.inference_mode()
def test_paged_layout_equals_the_cache_path_bit_for_bit() -> None:
    """One sequence's window computed alone over a contiguous cache, and inside a paged batch (its
    blocks out of order, another sequence's prompt chunk before it, padding rows after it): the same
    hidden states and K/V to the last bit."""
    model = _adapted(torch.bfloat16, "int4", "smollm2")
    cfg = model.cfg
    g = torch.Generator().manual_seed(9)
    prefix, w, bs = 37, 5, 16
    ids = torch.randint(0, 512, (prefix + w,), generator=g)
    other = torch.randint(0, 512, (11,), generator=g)
    mask = torch.ones(w, w, dtype=torch.bool).tril()
    mask[3:, 1] = False
    gate = torch.tensor([0.0, 1, 1, 1, 1])
    cache = model.new_cache(capacity=128)
    model.hidden(ids[:prefix], torch.arange(prefix), cache)
    alone = model.hidden(ids[prefix:], prefix + torch.arange(w), cache, gate=gate, window_mask=mask)[0]

    # the pool: sequence A (ours) in blocks 5, 2, 7 (logical order), sequence B in block 3
    pool = PagedKV(torch.zeros(cfg.num_layers, cfg.num_kv_heads, 10 * bs, cfg.head_dim, dtype=torch.bfloat16),
                   torch.zeros(cfg.num_layers, cfg.num_kv_heads, 10 * bs, cfg.head_dim, dtype=torch.bfloat16))
    table_a, table_b = [5, 2, 7], [3]
    slot = lambda table, k: table[k // bs] * bs + k % bs
    # prefill A through the paged path in one chunk
    tables = torch.tensor([table_a])
    rows = NativeRows(torch.zeros(prefix, dtype=torch.long), torch.arange(1, prefix + 1), torch.zeros(prefix, dtype=torch.long),
                      torch.zeros(prefix, 0, dtype=torch.uint8), tables, bs)
    model.hidden_paged(ids[:prefix], torch.arange(prefix), pool,
                       PagedBatch(torch.tensor([slot(table_a, k) for k in range(prefix)]), [], native=rows))
    # then B's prompt chunk and A's window in one batch, padded to 20 rows
    n_b, total = len(other), len(other) + w + 4
    seq = [1] * n_b + [0] * w + [-1] * 4
    ctx = list(range(1, n_b + 1)) + [prefix] * w + [0] * 4
    ws = [0] * n_b + [prefix] * w + [0] * 4
    win = torch.zeros(total, w, dtype=torch.uint8)
    win[n_b:n_b + w] = mask
    rows = NativeRows(torch.tensor(seq), torch.tensor(ctx), torch.tensor(ws), win,
                      torch.tensor([table_a, table_b + [0, 0]]), bs)
    write = [slot(table_b, k) for k in range(n_b)] + [slot(table_a, prefix + i) for i in range(w)]
    batch_ids = torch.cat([other, ids[prefix:], torch.zeros(4, dtype=torch.long)])
    positions = torch.cat([torch.arange(n_b), prefix + torch.arange(w), torch.zeros(4, dtype=torch.long)])
    batch_gate = torch.cat([torch.zeros(n_b), gate, torch.zeros(4)])
    out = model.hidden_paged(batch_ids, positions, pool, PagedBatch(torch.tensor(write), [], native=rows), batch_gate)
    assert torch.equal(out[n_b:n_b + w], alone)
    for k in range(prefix + w):
        assert torch.equal(pool.k[:, :, slot(table_a, k)], cache.k[:, 0, :, k]), f"K of key {k}"
        assert torch.equal(pool.v[:, :, slot(table_a, k)], cache.v[:, 0, :, k]), f"V of key {k}"


@torch.inference_mode()
def test_gated_rows_do_not_touch_clean_rows() -> None:
    """R-ISD: the adapter changes only gated rows; a clean row of a gated window equals the base model's."""
    adapted = _adapted(torch.bfloat16, "int4", "smollm2")
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 512, (45,), generator=g)
    gate = torch.zeros(45)
    gate[40:] = 1
    on = adapted.hidden(ids, torch.arange(45), adapted.new_cache(capacity=64), gate=gate)[0]
    off = adapted.hidden(ids, torch.arange(45), adapted.new_cache(capacity=64))[0]
    assert torch.equal(on[:40], off[:40])
    assert not torch.equal(on[40:], off[40:])


def test_the_kernel_rejects_what_it_cannot_take() -> None:
    ops = native.ops()
    with pytest.raises(RuntimeError, match="codes must be in 0..15"):
        ops.int4_pack(torch.full((16, 32), 16), torch.ones(16, 1), torch.zeros(16, 1))
    with pytest.raises(RuntimeError, match="K % 32"):
        ops.int4_pack(torch.zeros(16, 40, dtype=torch.long), torch.ones(16, 1), torch.zeros(16, 1))
    packed, params = ops.int4_pack(torch.zeros(16, 64, dtype=torch.long), torch.ones(16, 2), torch.zeros(16, 2))
    with pytest.raises(RuntimeError, match="K does not match"):
        ops.wmm(torch.zeros(2, 32, dtype=torch.bfloat16), packed, params, 4, 16)


def _int8_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's activation quantization: per row and group of 32, xq = round(x * 127 / max|x|) (fp32, ties
    to even), dx = max|x| / 127. Returns xq (M, K) and dx (M, K/32)."""
    m, k = x.shape
    xg = x.float().reshape(m, k // 32, 32)
    amax = xg.abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    return torch.round(xg * inv[..., None]).reshape(m, k), amax / torch.tensor(127.0)


@pytest.mark.parametrize("kind", ["int4", "int8", "w4a8", "w8a8"])
def test_the_kernel_equals_its_reference_with_bias_and_odd_sizes(kind: str) -> None:
    """idlm's kernel (``wmm.cpp``): N not a multiple of 16, a bias, row counts 1..40; each output within bf16
    rounding of the fp32 product, and every row the same bits whatever the row count."""
    ops = native.ops()
    a8 = kind.endswith("a8")
    g = torch.Generator().manual_seed(1)
    n, k = 37, 96
    x = torch.randn(40, k, generator=g).to(torch.bfloat16)
    x[3, :32] = 0  # an all-zero activation group
    bias = torch.randn(n, generator=g)
    if kind in ("int4", "w4a8"):
        q = torch.randint(0, 16, (n, k), generator=g)
        s, m = torch.rand(n, k // 32, generator=g) * 0.1, torch.randn(n, k // 32, generator=g) * 0.1
        packed, params = ops.int4_pack(q, s, m, a8)
        w = q.float() * s.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
        code = 14 if a8 else 4
    else:
        q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        s = torch.rand(n, generator=g) * 0.01
        packed, params = ops.int8_pack(q, s, a8)
        w = q.float() * s[:, None]
        code = 18 if a8 else 8
    y = ops.wmm(x, packed, params, code, n, bias)
    if a8:  # the reference sees the same quantized activations: only fp32 and the output's bf16 rounding differ
        xq, dx = _int8_activations(x)
        ref = (xq.double() * dx.double().repeat_interleave(32, 1)) @ w.double().T + bias.double()
    else:
        ref = x.double() @ w.double().T + bias.double()
    assert y.shape == (40, n) and y.dtype == torch.bfloat16
    assert ((y.double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-4 * ref.abs().max()).all()
    for m_rows in range(1, 40):
        assert torch.equal(ops.wmm(x[:m_rows], packed, params, code, n, bias), y[:m_rows])


def test_the_plan_follows_adapter_and_quantization_changes() -> None:
    """The weights the plan derived (fused [W; A], scale · B, packed kernels) are rebuilt when the adapter
    changes in place or the layers are quantized: the native forward never runs on stale weights."""
    model = _adapted(torch.bfloat16, "none", "smollm2")
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(0, 512, (20,), generator=g)
    gate = torch.zeros(20)
    gate[15:] = 1

    def run():
        with torch.inference_mode():
            return model.hidden(ids, torch.arange(20), model.new_cache(capacity=32), gate=gate)[0]

    def plan():
        with torch.inference_mode():
            return model.native_plan()

    first, old = run(), plan()
    assert plan() is old  # unchanged: reused
    with torch.no_grad():
        model.layers[0].gate_up.lora_B.mul_(3.0)
    second = run()
    assert plan() is not old
    assert torch.equal(second[:15], first[:15]) and not torch.equal(second[15:], first[15:])
    model.use_native(False)
    python = run()
    model.use_native(True)
    with torch.inference_mode():
        assert _kl(model.logits(second), model.logits(python)).mean() < 2e-3  # the new adapter, not the old one
    old = plan()
    quantize_model(model, "int4")
    assert plan() is not old and torch.isfinite(run()).all()
