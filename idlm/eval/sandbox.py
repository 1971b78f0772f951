"""Run untrusted model-written Python (HumanEval completions) in a separate, limited process.

Each program runs as its own ``python -I`` process (isolated mode: no environment variables, no
user site-packages, the script's folder is not on ``sys.path``) with:

* a **wall-clock timeout**: the whole process group is killed with SIGKILL when it runs past it;
* **resource limits** (``setrlimit``): address space (``RLIMIT_AS``, default 1 GiB, so a memory bomb
  gets ``MemoryError`` instead of taking the machine), CPU seconds (``RLIMIT_CPU``), file size
  (``RLIMIT_FSIZE``, 16 MiB per file), open files (``RLIMIT_NOFILE``), processes (``RLIMIT_NPROC``)
  and no core dumps;
* a **private temporary directory** as its working directory and ``HOME``/``TMPDIR``, deleted
  afterwards, and an environment with nothing but ``PATH``;
* **no network**: when ``unshare`` can create a network namespace (root, or unprivileged user
  namespaces), the process runs in a fresh one that has only a downed loopback, so every connect
  fails (``ENETUNREACH``), including to servers on the host's 127.0.0.1;
* **an unprivileged user** when we run as root: ``unshare --setuid/--setgid 65534`` (nobody), so the
  program cannot write outside its temp dir or world-writable places, cannot signal our processes,
  and ``RLIMIT_NPROC`` is enforced (the kernel does not enforce it for root).

What it does **not** stop (it is not a container or VM): reading any file the unprivileged user can
read (e.g. world-readable files under /etc or the repo), writing to world-writable directories
such as /tmp (bounded per file by ``RLIMIT_FSIZE``), using CPU up to the limits, any system call
(there is no seccomp filter), and kernel exploits. Without ``unshare`` (a container that forbids
namespaces), there is no network isolation beyond a Python-level guard that replaces
``socket.socket``, which a determined program can get around; ``isolation()`` says which applies.
Run benchmarks of untrusted models in a disposable VM or container if that matters.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

NOBODY = 65534
GiB = 1 << 30

# Prepended when no network namespace is available: best effort, documented above as bypassable.
SOCKET_GUARD = ("import socket as _s\n"
                "def _no_net(*a, **k):\n"
                "    raise PermissionError('network access is disabled in the idlm sandbox')\n"
                "_s.socket = _s.create_connection = _s.socket_pair = _no_net\n"
                "del _s, _no_net\n")


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then SIGKILL to the process group
    memory_bytes: int = 1 * GiB  # RLIMIT_AS
    cpu_s: int = 0  # RLIMIT_CPU; 0 = ceil(timeout) + 1
    file_bytes: int = 16 << 20  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    processes: int = 256  # RLIMIT_NPROC (per user; enforced when we drop to nobody)


@dataclass(frozen=True)
class ExecResult:
    passed: bool  # exit status 0 within the timeout
    status: str  # passed | failed | timeout
    detail: str  # the tail of stderr (the exception), or what killed it
    returncode: int | None


@functools.lru_cache(maxsize=1)
def isolation() -> tuple[tuple[str, ...], str]:
    """(command prefix, interpreter) that isolate a program best here, probed once: ``unshare`` with
    a network namespace and nobody's uid when root (with an interpreter nobody may run: ours may
    live under a private home, so the system ``python3`` is the fallback; HumanEval needs only the
    standard library), a network namespace alone, or nothing."""
    exe = shutil.which("unshare")
    pythons = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                                  if p != sys.executable and os.path.exists(p)]
    candidates = []
    if exe is not None:
        if os.geteuid() == 0:
            candidates += [((exe, "--net", f"--setgid={NOBODY}", f"--setuid={NOBODY}"), py) for py in pythons]
            candidates.append(((exe, "--net"), sys.executable))
        candidates.append(((exe, "--net", "--map-root-user"), sys.executable))
    for pre, py in candidates:
        try:
            r = subprocess.run([*pre, py, "-I", "-c", "pass"], check=False, capture_output=True, timeout=30, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return pre, py
    return (), sys.executable


def describe() -> str:
    """One line: what isolation applies on this machine."""
    pre, py = isolation()
    if not pre:
        return "no namespaces available: rlimits + private temp dir + Python-level socket guard only"
    user = "as nobody" if any(p.startswith("--setuid") for p in pre) else "as the current user"
    return f"network namespace (no network), {user}, rlimits, private temp dir ({py})"


def network_isolated() -> bool:
    return bool(isolation()[0])


def limits_prelude(lim: Limits) -> str:
    """Python source that lowers the process's own limits, soft and hard, before anything else runs.
    (Set by the program itself rather than in a ``preexec_fn``, which is unsafe in our threaded
    process; an unprivileged process cannot raise a hard limit again.)"""
    cpu = lim.cpu_s or int(lim.timeout_s) + 1
    pairs = (("RLIMIT_AS", lim.memory_bytes), ("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", lim.file_bytes),
             ("RLIMIT_NOFILE", lim.open_files), ("RLIMIT_NPROC", lim.processes), ("RLIMIT_CORE", 0))
    body = "".join(f"_lim(_r.{name}, {value})\n" for name, value in pairs)
    return ("import resource as _r\n"
            "def _lim(k, v):\n"
            "    hard = _r.getrlimit(k)[1]\n"
            "    v = v if hard == _r.RLIM_INFINITY else min(v, hard)\n"
            "    _r.setrlimit(k, (v, v))\n"
            f"{body}del _r, _lim\n")


def run_program(source: str, timeout_s: float = 10.0, limits: Limits | None = None) -> ExecResult:
    """Run ``source`` as a Python program under the limits above; passed = exit status 0."""
    lim = limits or Limits(timeout_s=timeout_s)
    pre, python = isolation()
    work = tempfile.mkdtemp(prefix="idlm-sandbox-")
    try:
        source = limits_prelude(lim) + ("" if pre else SOCKET_GUARD) + source
        path = os.path.join(work, "program.py")
        with open(path, "w") as f:
            f.write(source)
        if any(p.startswith("--setuid") for p in pre):
            os.chown(work, NOBODY, NOBODY)
            os.chown(path, NOBODY, NOBODY)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1"}
        proc = subprocess.Popen([*pre, python, "-I", path], cwd=work, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=lim.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecResult(False, "timeout", f"killed after {lim.timeout_s:g} s wall clock", None)
        detail = err.decode("utf-8", "replace").strip()[-2000:]
        if proc.returncode == 0:
            return ExecResult(True, "passed", "", 0)
        if proc.returncode < 0:
            detail = f"killed by {signal.Signals(-proc.returncode).name}. {detail}".strip()
        return ExecResult(False, "failed", detail, proc.returncode)
    finally:
        _kill_leftovers(work)
        shutil.rmtree(work, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_leftovers(work: str) -> None:
    """Children the program forked into its own session survive the group kill; find them by
    their working directory (our private temp dir) and kill them too."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(work):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue
