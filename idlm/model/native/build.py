"""Building and loading idlm's native CPU code (see the package docstring): compile once per source, compiler
flags and CPU into ``$IDLM_CACHE/native``, load it, and say what the CPU offers (``cpu_description``, ``isa``)."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


def ops():
    return torch.ops.idlm_native
