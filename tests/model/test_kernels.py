"""idlm's native kernels (``native/dense.cpp``, ``native/wmm.cpp``): accurate, row-stable for every row
count, and the same bits whatever instruction set they were built for (the 16-lane arithmetic of
``simd.h`` and the exact integer dot products of the int8-activation kernels are fixed by the source)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from idlm.model import native

if not native.load():
    if os.environ.get("CI", "").lower() == "true":
        raise RuntimeError(f"CI needs the native code: {native.why()}")
    pytest.skip(f"native code unavailable: {native.why()}", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16]
IDS = ["fp32", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("shape", [(576, 960), (100, 37), (1536, 33), (7, 5)])
def test_linear_is_accurate_and_every_row_is_the_same_alone(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    ops = native.ops()
    k, n = shape
    g = torch.Generator().manual_seed(k + n)
    x = torch.randn(40, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g)
    y = ops.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (40, n)
    ref = x.double() @ w.double().T + b.double()
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    assert ((y.double() - ref).abs() <= tol * ref.abs() + 1e-5 * (k ** 0.5)).all()
    alone = torch.cat([ops.linear(x[i:i + 1], w, b) for i in range(40)])
    for m in range(1, 41):
        assert torch.equal(ops.linear(x[:m], w, b), alone[:m]), m
    assert torch.equal(ops.linear(x[:3], w, None), ops.linear(x[:3], w, torch.zeros(n)))


def test_linear_and_attend_refuse_what_they_cannot_take() -> None:
    ops = native.ops()
    with pytest.raises(RuntimeError, match="x \\(M, K\\), w \\(N, K\\)"):
        ops.linear(torch.zeros(2, 8), torch.zeros(3, 9), None)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.linear(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="bias \\(R, T, S\\)"):
        ops.attend(torch.zeros(2, 3, 16), torch.zeros(2, 5, 16), torch.zeros(2, 5, 16), torch.zeros(1, 3, 4), 2, 1)


# The same inputs, computed by this build and by another one (another -march) in a subprocess.
_CROSS = textwrap.dedent("""
    import sys, torch
    from idlm.model import native
    assert native.load(), native.why()
    ops = native.ops()
    g = torch.Generator().manual_seed(0)
    out = {"isa": ops.isa()}
    for dt, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        x, w, b = torch.randn(9, 200, generator=g).to(dt), torch.randn(37, 200, generator=g).to(dt), torch.randn(37, generator=g)
        out["linear_" + name] = ops.linear(x, w, b)
        q, k, v = torch.randn(4, 6, 48, generator=g).to(dt), torch.randn(4, 50, 48, generator=g).to(dt), torch.randn(4, 50, 48, generator=g).to(dt)
        bias = torch.where(torch.rand(2, 3, 50, generator=g) < 0.8, 0.0, float("-inf"))
        bias[..., 0] = 0
        out["attend_" + name] = ops.attend(q, k, v, bias, 2, 2)
    x = torch.randn(7, 96, generator=g).to(torch.bfloat16)
    q4 = torch.randint(0, 16, (40, 96), generator=g)
    s4, m4 = torch.rand(40, 3, generator=g) * 0.1, torch.randn(40, 3, generator=g) * 0.1
    q8, s8 = torch.randint(-127, 128, (40, 96), generator=g, dtype=torch.int8), torch.rand(40, generator=g) * 0.01
    bias = torch.randn(40, generator=g)
    for a8 in (False, True):
        p, prm = ops.int4_pack(q4, s4, m4, a8)
        out[f"int4_{a8}"] = ops.wmm(x, p, prm, 14 if a8 else 4, 40, bias)
        p, prm = ops.int8_pack(q8, s8, a8)
        out[f"int8_{a8}"] = ops.wmm(x, p, prm, 18 if a8 else 8, 40, bias)
    torch.save(out, sys.argv[1])
""")


def _run_build(path, march: str | None) -> dict:
    env = dict(os.environ)
    if march is None:
        env.pop("IDLM_NATIVE_MARCH", None)
    else:
        env["IDLM_NATIVE_MARCH"] = march
    subprocess.run([sys.executable, "-c", _CROSS, str(path)], env=env, check=True, timeout=900)
    return torch.load(path)


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the other build's -march is an x86-64 level")
def test_every_instruction_set_gives_the_same_bits(tmp_path) -> None:
    """This machine's build against the portable one (-march=x86-64-v2: no AVX2, no FMA unit): dense linear,
    attention and the int8-activation kernels give identical bits; the bf16-activation quantized kernels too,
    unless this build has AVX-512 BF16 (vdpbf16ps sums pairs, a different order by design)."""
    here = _run_build(tmp_path / "here.pt", os.environ.get("IDLM_NATIVE_MARCH"))
    portable = _run_build(tmp_path / "portable.pt", "x86-64-v2")
    assert "portable" in portable["isa"]
    bf16dp = "avx512-bf16" in here["isa"]
    for key, value in here.items():
        if key == "isa" or (bf16dp and key in ("int4_False", "int8_False")):
            continue
        assert torch.equal(value, portable[key]), f"{key}: {here['isa']} vs {portable['isa']}"
