"""idlm's native CPU code: the kernels every inference matmul and attention runs through, and the
native forward (``forward.cpp``), a decoder's whole layer stack in one C++ call.

* ``dense.cpp``: ``linear`` (fp32 / bf16 weights) and ``attend`` (one query row over its visible keys),
  used by the Python forward and the native one; ``wmm.cpp``: the quantized kernels (int4 / int8
  weights, bf16 or int8 activations). Every output's reduction order is fixed by the source, so a row's
  result never depends on how many rows share the call (what lossless ISD needs), on any CPU. The
  16-lane arithmetic (``simd.h``) is the same on AVX-512, AVX2 and the portable build.
* ``forward.cpp``: the Python forward costs ~8,000 ATen calls per step, and on a small CPU model their
  overhead is most of the step. The native forward runs the kernels above and does everything between
  them in plain per-row loops whose floating-point order is fixed. Used for bf16 inference on the CPU.

It is compiled on first use with the machine's C++ compiler (``torch.utils.cpp_extension``, ~20 s,
cached under ``$IDLM_CACHE/native`` per source, compiler flags and CPU) for the machine's own instruction
set (``-march=native``; ``IDLM_NATIVE_MARCH`` picks another). ``IDLM_NATIVE=0`` turns it off; without a
compiler the Python forward runs on PyTorch's kernels, which ``idlm.model.rowcheck`` checks at load.
The native and the Python forward are each exact and batch-invariant, but they round differently from
each other (like two thread counts): one process uses one of them for a model, never a mix.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("forward.cpp", "wmm.cpp", "dense.cpp", "wmm.h", "dense.h", "simd.h")]


def _flags() -> list[str]:
    """Compiler flags. ``IDLM_NATIVE_MARCH`` (default native) sets -march, e.g. x86-64-v3 to build and test the
    AVX2 paths on a CPU with AVX-512, x86-64-v2 for the portable ones."""
    march = os.environ.get("IDLM_NATIVE_MARCH", "native").strip() or "native"
    return ["-O3", f"-march={march}", "-ffp-contract=off", "-fno-fast-math", "-fopenmp", "-std=c++17"]


_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "why": str


def enabled_by_env() -> bool:
    return os.environ.get("IDLM_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_tag() -> str:
    """The CPU's feature flags, hashed: the build uses -march=native, so a cached build is per CPU."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha256(flags.encode()).hexdigest()[:8]


_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16")


def cpu_description() -> str:
    """The CPU model and the instruction-set flags idlm's kernels care about, from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU"
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "unknown CPU")
    flags = set(next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), []))
    have = [f for f in _FEATURES if f in flags]
    return f"{model} ({' '.join(have) or 'none of ' + ' '.join(_FEATURES)})"


def load() -> bool:
    """Compile (once per source, CPU and torch version) and load the extension. False, with the reason
    in ``why()``, when it is turned off or cannot be built."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if not enabled_by_env():
            _state.update(ok=False, why="turned off (IDLM_NATIVE=0)")
            return False
        try:
            from torch.utils.cpp_extension import load as cpp_load

            from ...config import cache_dir

            src = b"".join(p.read_bytes() for p in SOURCES)
            flags = _flags()
            tag = hashlib.sha256(src + torch.__version__.encode() + " ".join(flags).encode()).hexdigest()[:10]
            name = f"idlm_native_{tag}_{_cpu_tag()}"
            build = cache_dir() / "native" / name
            build.mkdir(parents=True, exist_ok=True)
            with _build_lock(build):
                cpp_load(name, [str(p) for p in SOURCES if p.suffix == ".cpp"], extra_cflags=flags,
                         extra_ldflags=["-fopenmp"], build_directory=str(build), is_python_module=False, verbose=False)
            _state.update(ok=True, why="", name=name)
            _prune(build.parent, name)
        except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a build error: the Python forward runs
            msg = str(e).strip().splitlines()
            _state.update(ok=False, why=f"could not build the native forward ({msg[-1] if msg else type(e).__name__})")
            log.warning("idlm: %s; using the Python forward", _state["why"])
        return bool(_state["ok"])


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """Hold an OS lock on ``build`` (released by the kernel if this process dies) while torch builds there.
    torch's own lock is a file that a killed build leaves behind, after which every later process waits for it
    forever; holding ours, no other idlm process is building here, so such a file is stale and removed."""
    with open(build / ".idlm-build.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        (build / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prune(folder: Path, keep: str) -> None:
    """Remove builds of other sources for this CPU (best effort: a process that loaded one keeps its copy), but
    never one that a process is building or loading right now (it holds that build's lock)."""
    import shutil

    for d in folder.glob("idlm_native_*"):
        if d.name == keep or d.name.split("_")[-1] != keep.split("_")[-1]:  # this build, or another CPU's
            continue
        try:
            with open(d / ".idlm-build.lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(d, ignore_errors=True)
        except OSError:  # in use (or already gone): leave it
            continue


def why() -> str:
    return str(_state.get("why", ""))


def isa() -> str:
    """The instruction sets the loaded build's kernels use (empty when it is not loaded)."""
    return str(ops().isa()) if load() else ""


def build_tag(model) -> str:
    """Which forward (and which build of it) ``model`` runs: part of cache keys of measured costs."""
    return str(_state.get("name")) if model.runs_native else "python"


def describe(model) -> str:
    """One line: which forward ``model``'s inference runs, and why when it is not the native one."""
    if model.runs_native:
        return "native"
    reason = unsupported(model) or why() or "turned off for this model"
    return f"python ({reason})"


def ops():
    return torch.ops.idlm_native


@dataclass
class NativeRows:
    """Who attends to what, for the native forward: token t of the batch belongs to table row
    ``seq[t]`` (-1: padding) and sees that sequence's logical keys [0, ctx[t]) plus logical key
    ``ws[t] + j`` for each j with ``win[t, j]`` (an ISD window's own slots). Keys are visited in
    logical order, so a row's keys, and hence its bits, do not depend on the batch layout."""

    seq: torch.Tensor  # (T,) int64
    ctx: torch.Tensor  # (T,) int64
    ws: torch.Tensor  # (T,) int64
    win: torch.Tensor  # (T, W) uint8 (W may be 0)
    tables: torch.Tensor  # (R, blocks) int64 block tables; empty: logical key k is pool slot k
    block_size: int = 1


_EMPTY = torch.empty(0, dtype=torch.long)


class Plan:
    """A model's weights registered with the extension (one handle; released with the plan).

    ``fresh(model)`` tells whether the plan still matches the model: the same quantization, dtype and
    projection modules (no adapter added, no layer quantized since) and the same in-place versions of
    the adapters (not trained or reloaded since). Dense weights and norms are not checked: the plan
    shares their storage, so in-place changes reach it anyway. About 30 us a forward."""

    def __init__(self, model):
        self.quant_mode, self.dtype = model.quant_mode, model.dtype
        self.projs = _projections(model)
        self.watched = [(t, _version(t)) for t in _adapters(self.projs)]
        self.embed, self.norm = model._modules["embed"], model._modules["norm"]
        tensors, meta = _collect(model)
        self.handle = int(ops().plan_create(tensors, meta, float(model.cfg.rms_eps)))
        self._tensors = tensors  # keep the derived tensors (fused [W; A], scale · B) alive
        weakref.finalize(self, _release, self.handle)

    def fresh(self, model) -> bool:
        if model.quant_mode != self.quant_mode or model.dtype != self.dtype:
            return False
        mods = model._modules
        if mods["embed"] is not self.embed or mods["norm"] is not self.norm:
            return False
        it = iter(self.projs)
        for layer in mods["layers"]._modules.values():
            lm = layer._modules
            for name in _PROJ_NAMES:
                if lm[name] is not next(it, None):
                    return False
        if next(it, None) is not None:
            return False
        return all(_version(t) == v for t, v in self.watched)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, gated: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor, rows: NativeRows) -> torch.Tensor:
        return ops().forward(self.handle, x, cos, sin, gated, k, v, write_slots, rows.seq, rows.ctx, rows.ws,
                             rows.win, rows.tables, rows.block_size)


def _release(handle: int) -> None:
    try:
        ops().plan_release(handle)
    except Exception as e:  # noqa: BLE001 - at interpreter shutdown the op registry may be gone
        log.debug("idlm: releasing native plan %d: %s", handle, e)


def unsupported(model) -> str | None:
    """Why ``model`` cannot run natively (None when it can)."""
    cfg = model.cfg
    if model.dtype != torch.bfloat16:
        return "native forward is bf16 only"
    if model.embed.weight.device.type != "cpu":
        return "native forward is CPU only"
    if cfg.head_dim % 16 or cfg.head_dim > 1024:
        return f"head_dim {cfg.head_dim} (needs a multiple of 16, at most 1024)"
    if (cfg.num_heads // cfg.num_kv_heads) * (cfg.head_dim // 16) > 256:
        return "more than 256 query vectors of 16 per K/V head"
    return None


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot change in place)
        return None


_PROJ_NAMES = ("qkv", "o", "gate_up", "down")


def _projections(model) -> list:
    return [layer._modules[name] for layer in model.layers._modules.values() for name in _PROJ_NAMES]


def _adapters(projs: list) -> list[torch.Tensor]:
    return [t for p in projs for t in (p._parameters.get("lora_A"), p._parameters.get("lora_B")) if t is not None]


# ---- weights -> the plan's tensor list and meta ----------------------------------------------------

_DENSE = 0  # Kind in forward.cpp; quantized layers use their QuantLinear.code (4 / 8 / 14 / 18)
_NONE = torch.empty(0)


def _lin(q=None, w: torch.Tensor | None = None, bias: torch.Tensor | None = None, cols: int = 0):
    """One linear: ([w, scales, bias], [kind, cols]) from a QuantLinear ``q`` or a dense bf16 ``w``."""
    if q is not None:
        kind = q.code
        b = q.qbias if q.qbias is not None else _NONE
        return [q.packed, q.scales, b], [kind, q.out_features]
    if w is not None:
        b = _NONE if bias is None else bias.detach().float().contiguous()
        return [w.detach().to(torch.bfloat16).contiguous(), _NONE, b], [_DENSE, cols or w.shape[0]]
    return [_NONE, _NONE, _NONE], [-1, 0]


def _proj(p) -> tuple[list, list]:
    """A decoder projection (plain, quantized, gated LoRA over either) as main / A / B linears."""
    out = p.out_features
    quant = p._modules.get("quant")
    has_lora = hasattr(p, "lora_A")
    rank = p.rank if has_lora else 0
    a = b = ([_NONE] * 3, [-1, 0])
    fused = False
    if quant is not None:
        main = _lin(q=quant)
        if has_lora:
            fused = quant.out_features == out + rank
            if not fused:
                a = _lin(w=p.lora_A)
            bq = p._modules.get("lora_b_quant")
            b = _lin(q=bq) if bq is not None else _lin(w=p._scaled_b(torch.bfloat16))
    elif has_lora:
        fw, fb = p._fused(torch.bfloat16)
        main = _lin(w=fw, bias=fb)
        fused = True
        b = _lin(w=p._scaled_b(torch.bfloat16))
    else:
        main = _lin(w=p.weight, bias=p.bias)
    tensors = main[0] + a[0] + b[0]
    meta = [out, rank, int(fused)] + main[1] + a[1] + b[1]
    return tensors, meta


def _collect(model) -> tuple[list[torch.Tensor], list[int]]:
    cfg = model.cfg
    bf = torch.bfloat16
    tensors: list[torch.Tensor] = []
    meta = [cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size]
    for layer in model.layers:
        tensors += [layer.ln1.weight.detach().to(bf).contiguous(), layer.ln2.weight.detach().to(bf).contiguous()]
        if cfg.qk_norm:
            tensors += [layer.q_norm.weight.detach().to(bf).contiguous(), layer.k_norm.weight.detach().to(bf).contiguous()]
        else:
            tensors += [_NONE, _NONE]
        for name in ("qkv", "o", "gate_up", "down"):
            t, m = _proj(getattr(layer, name))
            tensors += t
            meta += m
    tensors.append(model.norm.weight.detach().to(bf).contiguous())
    return tensors, meta
