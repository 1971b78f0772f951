"""Weight-only quantized layers (``idlm.model.quant``): GGUF blocks read exactly, kernels agree with
dequantize-then-matmul, rows are stable across row counts, and quantized greedy ISD == greedy AR.

Tolerances: the kernels take bf16 activations and round their output to bf16, so a quantized
linear is compared with the fp32 product of the same bf16 input and the kernel's exact dequantized
weight at 2^-7 relative to the output's scale (bf16 keeps 8 significant bits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from idlm.config import DecodeConfig, SamplingParams
from idlm.decode import ar_generate, isd_generate
from idlm.model import Decoder, ModelConfig
from idlm.model.loading import ModelLoadError, default_gguf_path, load_model
from idlm.model.quant import (
    QuantLinear,
    _dense_spec,
    _llama_rows,
    _pack,
    _spec_from_parts,
    gguf_blocks,
    gguf_dequantize,
    int4_from_codes,
    int4_from_dense,
    int4_reference,
    int8_from_dense,
    quantize_model,
)

from ..decode.tiny import tiny_model, tiny_risd_pair
from .test_window_exact import _shaped_like_smollm2


@pytest.fixture(scope="module")
def reader():
    from gguf import GGUFReader

    return GGUFReader(str(default_gguf_path()))


def _tensor(reader, name):
    return next(t for t in reader.tensors if t.name == name)


def _ours(t) -> torch.Tensor:
    k = int(t.shape[0])  # GGUF lists dims fastest-first: (K, N)
    q, d, m = gguf_blocks(t.tensor_type.name, t.data, k)
    return gguf_dequantize(t.tensor_type.name, q, d, m)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "blk.29.ffn_gate.weight",
                                  "token_embd.weight"])
def test_gguf_blocks_equal_the_reference_dequantization_on_the_default_model(reader, name: str) -> None:
    from gguf.quants import dequantize

    t = _tensor(reader, name)
    assert t.tensor_type.name in ("Q4_1", "Q8_0")  # what the default GGUF holds (token_embd is Q8_0)
    ref = torch.from_numpy(np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32))
    ours = _ours(t)
    assert ours.shape == ref.shape
    assert torch.equal(ours, ref), f"{name}: {(ours - ref).abs().max()}"


def test_gguf_q4_0_blocks_equal_the_reference_dequantization(reader) -> None:
    """The default GGUF has no Q4_0 tensor: quantize one of its real weights to Q4_0 with gguf's own
    quantizer, then read the blocks back."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w = _ours(_tensor(reader, "blk.3.attn_output.weight")).numpy()
    data = quantize(w, GGMLQuantizationType.Q4_0)
    ref = torch.from_numpy(np.asarray(dequantize(data, GGMLQuantizationType.Q4_0), dtype=np.float32))
    q, d, m = gguf_blocks("Q4_0", data, w.shape[1])
    assert m is None and int(q.min()) >= 0 and int(q.max()) <= 15
    assert torch.equal(gguf_dequantize("Q4_0", q, d, m), ref)
    # packed as int4 codes with zero = 0: the kernel's weight is d·(q − 8), d rounded to bf16
    lin = int4_from_codes(q, d, torch.zeros_like(d))
    eye = torch.eye(w.shape[1], dtype=torch.bfloat16)
    got = lin(eye).float().T  # row j of I·Wᵀ is column j of Wᵀ: the weight itself, rounded to bf16
    want = int4_reference(q, d, torch.zeros_like(d)).to(torch.bfloat16).float()
    assert torch.equal(got, want)


def _random_q4_k(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid Q4_K rows with random codes, 6-bit scales / mins and small finite fp16 super-block scales."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, k // 256, 144), dtype=np.uint8)
    dd = rng.uniform(0.001, 0.02, (rows, k // 256, 2)).astype(np.float16)
    raw[..., :4] = dd.view(np.uint8)
    return raw.reshape(rows, -1)


def test_gguf_q4_k_blocks_equal_the_reference_dequantization_and_pack_as_they_are() -> None:
    """Q4_K (the blocks of the common Q4_K_M files): 256-column super-blocks of eight sub-blocks with
    6-bit scales and mins; each sub-block is a group of 32 for the int4 kernel, codes kept."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = _random_q4_k(48, 512)
    ref = torch.from_numpy(np.asarray(dequantize(data, GGMLQuantizationType.Q4_K), dtype=np.float32))
    q, d, m = gguf_blocks("Q4_K", data, 512)
    assert q.shape == (48, 512) and d.shape == m.shape == (48, 16)
    assert torch.equal(gguf_dequantize("Q4_K", q, d, m), ref)
    (kind, codes, scale, zero), source = _spec_from_parts([("Q4_K", data, None)], 512, "int4")
    assert kind == "int4" and source == "gguf Q4_K" and torch.equal(codes, q)  # the file's own codes
    lin = _pack((kind, codes, scale, zero), None, source)
    got = _dequantized(lin, 512)
    assert (got - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # scale / zero rounded to bf16 only


def test_a_fused_projection_mixing_block_types_is_packed_part_by_part() -> None:
    """q | k | v of a Q4_K_M file mix Q4_K and higher-precision tensors: Q4 parts keep their codes, the
    others are re-quantized from gguf's exact values, rows stay in order."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    a = _random_q4_k(32, 256, seed=1)
    b = np.random.default_rng(2).standard_normal((16, 256)).astype(np.float32) * 0.02
    spec, source = _spec_from_parts([("Q4_K", a, None), ("F32", b, None)], 256, "int4")
    assert source == "gguf Q4_K + gguf F32, re-quantized"
    got = _dequantized(_pack(spec, None, source), 256)
    ref_a = torch.from_numpy(np.asarray(dequantize(a, GGMLQuantizationType.Q4_K), dtype=np.float32))
    assert (got[:32] - ref_a).abs().max() <= 2 ** -7 * ref_a.abs().max()
    assert (got[32:] - torch.from_numpy(b)).abs().max() < 0.1 * abs(b).max()  # int4 of dense values


@pytest.mark.slow  # ~35 s; the GGUF block tests above check the same codes against gguf
@torch.inference_mode()
def test_packed_default_model_layers_equal_its_dense_weights() -> None:
    """Every fused projection packed from the GGUF (q/k rows un-permuted, q|k|v and gate|up stacked)
    reproduces the dense weights transformers dequantized into the cached folder, up to the bf16
    rounding of block scales and minimums."""
    dense = load_model("base", dtype=torch.float32).model
    packed = load_model("base", dtype=torch.float32, quant="int4")
    assert packed.quant.dense == [] and packed.quant.packed.get("gguf Q4_1") == 120
    eye = torch.eye(576, dtype=torch.bfloat16)
    for i in (0, 13, 29):
        for name in ("qkv", "o", "gate_up"):
            w = getattr(dense.layers[i], name).weight
            got = getattr(packed.model.layers[i], name).quant(eye[: w.shape[1], : w.shape[1]]).float().T
            err = (got - w).abs().max() / w.abs().max()
            assert err < 2 ** -7, f"layers.{i}.{name}: relative error {err}"
    w = dense.head_weight()
    got = packed.model.head_quant(eye).float().T
    assert ((got - w).abs().max() / w.abs().max()) < 2 ** -6  # head: Q8_0 blocks re-quantized per row (int8)


def test_llama_rows_undo_the_gguf_permutation() -> None:
    # llama.cpp stores each head's rotary pairs interleaved: row 2i / 2i + 1 of a head are HF rows i / i + d/2
    rows = _llama_rows(8, 1)
    assert rows.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def _ref_matmul(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = x.to(torch.bfloat16).float() @ w.T
    return y if bias is None else y + bias.to(torch.bfloat16).float()


@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("n", [64, 40])  # 40: not a multiple of 16, the int4 packer's alignment (padded)
@torch.inference_mode()
def test_quant_linear_equals_dequantize_then_matmul_and_is_row_stable(kind: str, n: int) -> None:
    g = torch.Generator().manual_seed(0)
    k = 96
    w = torch.randn(n, k, generator=g)
    bias = torch.randn(n, generator=g)
    lin = int4_from_dense(w, bias) if kind == "int4" else int8_from_dense(w, bias)
    assert lin.out_features == n and lin.packed.dtype == (torch.int8 if kind == "int8" else lin.packed.dtype)
    wq = _dequantized(lin, k)
    assert (wq - w).abs().max() < (0.07 if kind == "int4" else 0.01) * w.abs().max()  # the quantization error
    x = torch.randn(41, k, generator=g)
    y = lin(x.to(torch.bfloat16))
    assert y.shape == (41, n) and y.dtype == torch.bfloat16
    ref = _ref_matmul(x, wq, bias)
    assert (y.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()
    for m in (1, 2, 3, 5, 8, 9, 16, 17, 33):  # row-stable: a row's bits do not depend on the row count
        assert torch.equal(lin(x[:m].to(torch.bfloat16)), y[:m]), f"{kind}: rows differ at M={m}"
    assert lin(x[:3]).dtype == torch.float32  # returns the caller's dtype


@pytest.mark.parametrize("kind", ["int4", "int8"])
@torch.inference_mode()
def test_lora_a_rows_packed_into_the_kernel_leave_the_base_columns_bit_identical(kind: str) -> None:
    """R-ISD's A rides in the base kernel call as extra output rows: the base columns must be exactly the
    base layer's alone (the clean path stays the quantized base model), for every row count."""
    g = torch.Generator().manual_seed(3)
    w, a, bias = torch.randn(96, 64, generator=g), torch.randn(32, 64, generator=g) * 0.1, torch.randn(96, generator=g)
    spec = _dense_spec(w, kind)
    alone, fused = _pack(spec, bias, "dense"), _pack(spec, bias, "dense", extra=a)
    assert fused.out_features == 96 + 32
    x = torch.randn(33, 64, generator=g).to(torch.bfloat16)
    for m in (1, 2, 3, 5, 8, 9, 17, 33):
        y = fused(x[:m])
        assert torch.equal(y[:, :96], alone(x[:m])), f"{kind}: base columns moved at M={m}"
    t = fused(x)[:, 96:].float()
    ref = x.float() @ a.T
    assert (t - ref).abs().max() < (0.1 if kind == "int4" else 0.02) * ref.abs().max()  # A's quantization error


def _dequantized(lin: QuantLinear, k: int) -> torch.Tensor:
    """The weight the kernel computes with, read back through the kernel (I · Wᵀ, without the bias)."""
    bias, lin.qbias = lin.qbias, None
    try:
        return lin(torch.eye(k, dtype=torch.bfloat16)).float().T
    finally:
        lin.qbias = bias


def _modes() -> list[str]:
    """Every --quant mode this machine runs: int8 activations need idlm's VNNI kernel."""
    from idlm.model.quant import uses_idlm_kernel

    return ["int4", "int8"] + (["w4a8", "w8a8"] if uses_idlm_kernel("int8") else [])


def _quantized(model, mode: str):
    report = quantize_model(model, mode)
    assert report.dense == [] and sum(report.packed.values()) == 4 * len(model.layers) + 1
    return model


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("n", [2, 3, 5])
@torch.inference_mode()
def test_greedy_isd_equals_greedy_ar_quantized_tiny(mode: str, family: str, n: int) -> None:
    model = _quantized(tiny_model(seed=n, family=family).to(torch.bfloat16), mode)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    for prompt in ([3, 17, 5, 9], [11, 2, 40, 41, 7, 60, 1]):
        ar = ar_generate(model, prompt, params)
        isd = isd_generate(model, prompt, DecodeConfig(stride=n), params)
        assert isd.tokens == ar.tokens and len(ar.tokens) == 40


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("mode", _modes())
@torch.inference_mode()
def test_quantized_window_rows_equal_one_token_steps_bit_for_bit(mode: str, dtype: torch.dtype) -> None:
    """As tests/model/test_window_exact.py for bf16: on layers shaped like the default model's, every
    window row's logits and K/V equal a one-token step's, ``torch.equal`` (fp32: the kernels still take
    bf16 activations; norms, attention and the residual stream stay fp32)."""
    model = _quantized(_shaped_like_smollm2(dtype), mode)
    g = torch.Generator().manual_seed(1)
    for prefix, t in ((1, 2), (5, 3), (16, 5), (37, 9), (37, 16), (130, 7)):
        ids = torch.randint(0, 512, (prefix + t,), generator=g)
        pos = torch.arange(prefix + t)
        steps, win = model.new_cache(capacity=256), model.new_cache(capacity=256)
        for c in (steps, win):
            model.hidden(ids[:prefix], pos[:prefix], c)
        one = torch.cat([model.logits(model.hidden(ids[i:i + 1], pos[i:i + 1], steps))
                         for i in range(prefix, prefix + t)], dim=1)
        many = model.logits(model.hidden(ids[prefix:], pos[prefix:], win))
        assert torch.equal(one, many), f"{mode}: logits differ at prefix {prefix}, window {t}"
        assert torch.equal(steps.k[..., :prefix + t, :], win.k[..., :prefix + t, :])
        assert torch.equal(steps.v[..., :prefix + t, :], win.v[..., :prefix + t, :])


@pytest.mark.parametrize("mode", _modes())
@torch.inference_mode()
def test_risd_adapter_over_a_quantized_base_keeps_the_quantized_base_greedy_output(mode: str) -> None:
    """The gated LoRA stays dense on top of the quantized base: ISD with the adapter drafting equals
    AR of the quantized base (gate off)."""
    base, model = tiny_risd_pair(3)
    base, model = _quantized(base.to(torch.bfloat16), mode), _quantized(model.to(torch.bfloat16), mode)
    assert model.has_adapters and "quant" in model.layers[0].qkv._modules
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    for prompt in ([1, 2, 3], [5, 4, 6, 2, 0, 1]):
        ar = ar_generate(base, prompt, params)
        assert ar_generate(model, prompt, params).tokens == ar.tokens
        for n in (2, 4):
            assert isd_generate(model, prompt, DecodeConfig(stride=n), params).tokens == ar.tokens


def _small_model(hidden: int, intermediate: int, layers: int) -> Decoder:
    """A random llama-shaped decoder with chosen widths (to give the kernels shapes they cannot take)."""
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=hidden, intermediate_size=intermediate,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                      tie_embeddings=False, mask_token_id=64, num_embeddings=65, eos_token_ids=(63,))
    torch.manual_seed(0)
    return Decoder(cfg).eval().requires_grad_(False)


def _logits(model: Decoder) -> torch.Tensor:
    ids, pos = torch.tensor([1, 5, 9, 2]), torch.arange(4)
    return model.logits(model.hidden(ids, pos, model.new_cache(capacity=16)))


@torch.inference_mode()
def test_a_layer_the_int4_kernel_cannot_take_stays_dense_and_is_reported() -> None:
    """hidden 48 is not a multiple of the int4 group (32): the projections reading it (qkv, gate_up)
    stay dense, the others are packed, the report says which, and the outputs still match."""
    model = _small_model(hidden=48, intermediate=64, layers=2)
    before = _logits(model)
    report = quantize_model(model, "int4")
    assert sorted(report.dense) == [f"layers.{i}.{p}: input dim 48 is not a multiple of the int4 group 32"
                                    for i in (0, 1) for p in ("gate_up", "qkv")]
    assert report.packed == {"dense": 4, "head: dense": 1}
    assert "left dense" in report.summary()
    assert "quant" not in model.layers[0].qkv._modules and "quant" in model.layers[0].o._modules
    after = _logits(model)
    assert (after - before).abs().max() < 0.1 * before.abs().max()


def test_auto_quant_is_w4a8_or_int4_for_a_q4_gguf_on_the_cpu_and_none_otherwise(tmp_path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    from idlm.model.quant import auto_quant, uses_idlm_kernel

    # Q4_1 projections: packed as they are; int8 activations where idlm's VNNI kernel runs
    assert auto_quant(str(default_gguf_path())) == ("w4a8" if uses_idlm_kernel("int8") else "int4")
    assert auto_quant(str(default_gguf_path()), device="cuda") == "none"
    assert auto_quant(None) == "none"  # safetensors weights are quantized only when asked
    w = GGUFWriter(str(tmp_path / "q8.gguf"), "llama")  # a Q8_0 file: int4 would lose precision, so none
    from gguf.quants import quantize

    w.add_tensor("blk.0.attn_q.weight", quantize(np.ones((32, 64), np.float32), GGMLQuantizationType.Q8_0),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert auto_quant(str(tmp_path / "q8.gguf")) == "none"


@pytest.mark.slow  # ~14 s (a default-model load)
def test_int8_activations_without_the_kernel_are_a_clear_load_error(monkeypatch) -> None:
    from idlm.model import quant

    monkeypatch.setattr(quant, "uses_idlm_kernel", lambda act="bf16": False)  # as without a C++ compiler
    with pytest.raises(ValueError, match="needs idlm's native kernels"):
        quantize_model(tiny_model().to(torch.bfloat16), "w4a8")
    with pytest.raises(ModelLoadError, match="needs idlm's native kernels"):
        load_model("base", dtype=torch.bfloat16, quant="w8a8")


@torch.inference_mode()
def test_int8_needs_an_input_dim_multiple_of_16_and_otherwise_stays_dense() -> None:
    """Measured: _weight_int8pack_mm returns garbage (or crashes) for an input dim not a multiple of 16, so
    such a layer is never built: it stays dense and is reported."""
    with pytest.raises(ValueError, match="multiple of 16"):
        int8_from_dense(torch.randn(32, 40))
    model = _small_model(hidden=64, intermediate=40, layers=1)
    before = _logits(model)
    report = quantize_model(model, "int8")
    assert report.dense == ["layers.0.down: input dim 40 is not a multiple of 16 (the int8 kernel's)"]
    after = _logits(model)
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def test_unknown_quant_mode_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="unknown quantization 'int3'"):
        load_model("base", quant="int3")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(tiny_model(), "fp8")


@pytest.mark.slow
@pytest.mark.parametrize("mode", _modes())
def test_quantized_default_model_isd_equals_ar_128_tokens(mode: str) -> None:
    from idlm.eval.prompts import BUILTIN_PROMPTS, encode

    lm = load_model(None, dtype=torch.bfloat16, quant=mode)
    tok = lm.tokenizer()
    params = SamplingParams(max_new_tokens=128, ignore_eos=True)
    for prompt in BUILTIN_PROMPTS[:4]:
        ids = encode(tok, prompt, chat=True)
        ar = ar_generate(lm.model, ids, params)
        for n in (2, 3, 4):
            assert isd_generate(lm.model, ids, DecodeConfig(stride=n), params).tokens == ar.tokens, (mode, n, prompt)
