"""The matmul and attention kernels of the Python forward in inference, and how each is chosen.

Greedy ISD equals greedy AR, and a request's tokens do not depend on its batch, only if every row of an
inference forward is computed by the same arithmetic whatever else shares the call. PyTorch's CPU kernels
do not promise that: oneDNN, MKL and their AMX / AVX-512 / AVX2 code paths pick their blocking from the
shapes, and a row's rounding then depends on the row count, differently on each CPU. So:

* with idlm's native code built (``native``: the normal case), ``linear``, ``attend``, ``rms_norm`` and
  ``silu_mul`` run its kernels (``native/dense.cpp``), whose reduction order is fixed by their source, on
  every CPU;
* without it, PyTorch's kernels run, and ``rowcheck`` tests them at load on the model's shapes; a module
  whose kernel was seen to round a row differently in a batch gets ``by_row`` and runs one row per call.

Training (autograd on) and other devices always take PyTorch's kernels: row stability is an inference
property, and autograd needs PyTorch's ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import native
from .attention import attend_torch

_state = {"native": True}


@contextmanager
def pytorch_kernels() -> Iterator[None]:
    """Run the Python forward's matmuls and attention on PyTorch's kernels even where idlm's native ones are
    built (tests of the fallback, comparisons)."""
    old = _state["native"]
    _state["native"] = False
    try:
        yield
    finally:
        _state["native"] = old


def native_enabled() -> bool:
    """Whether inference runs idlm's native kernels (built, and not turned off by ``pytorch_kernels``)."""
    return _state["native"] and native.load()


def _native(x: torch.Tensor) -> bool:
    return _state["native"] and x.device.type == "cpu" and not torch.is_grad_enabled() \
        and x.dtype in (torch.float32, torch.bfloat16) and native.load()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, by_row: bool = False
           ) -> torch.Tensor:
    """``F.linear`` whose result for a row does not depend on the other rows of the call (in inference)."""
    if torch.is_grad_enabled() or x.device.type != "cpu":
        return F.linear(x, weight, bias)
    flat = x.reshape(-1, x.shape[-1])
    if _native(x) and weight.dtype in (torch.float32, torch.bfloat16):
        def fn(rows: torch.Tensor) -> torch.Tensor:
            return native.ops().linear(rows, weight, bias)
    else:
        def fn(rows: torch.Tensor) -> torch.Tensor:
            return F.linear(rows, weight, bias)
    y = per_row(fn, flat) if by_row else fn(flat)
    return y.view(*x.shape[:-1], weight.shape[0])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; in inference with the native code, idlm's (its per-row sum of squares in a
    fixed order); else ``F.rms_norm`` (a per-row reduction over a fixed length)."""
    if _native(x):
        return native.ops().rms_norm(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u; in inference with the native code, idlm's (one exp formula for every element, where a
    vectorized kernel may round its tail elements through another)."""
    if _native(g) and g.dtype == u.dtype and g.shape == u.shape:
        return native.ops().silu_mul(g, u)
    return F.silu(g) * u


def per_row(fn, flat: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to each row of ``flat`` alone, concatenated: the fallback of a kernel that failed the
    row-stability check (one row per call is the same call whatever the batch)."""
    if flat.shape[0] <= 1:
        return fn(flat)
    return torch.cat([fn(flat[i:i + 1]) for i in range(flat.shape[0])])


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, by_row: bool = False
           ) -> torch.Tensor:
    """Scaled dot-product attention of the Python forward in inference; shapes as ``attention.attend_torch``.

    q: (Hkv, R, G, T, D); k, v: (Hkv, R, S, D); bias: (R, T, S) fp32, 0 where a row may attend and -inf
    elsewhere. Returns (Hkv, R, G, T, D) fp32 (or ``attend_torch``'s dtype on PyTorch's kernels)."""
    hkv, r, g, t, d = q.shape
    if _native(q) and k.dtype in (torch.float32, torch.bfloat16):
        s = k.shape[2]
        out = native.ops().attend(q.reshape(hkv * r, g * t, d), k.reshape(hkv * r, s, d), v.reshape(hkv * r, s, d),
                                  bias, r, g)
        return out.view(hkv, r, g, t, d)
    if not by_row or t == 1:
        return attend_torch(q, k, v, bias)
    return torch.cat([attend_torch(q[:, :, :, i:i + 1], k, v, bias[:, i:i + 1]) for i in range(t)], 3)
