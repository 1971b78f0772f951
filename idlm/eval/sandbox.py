"""Run untrusted model-written Python (HumanEval completions) in a separate, limited process.

Each program runs as its own ``python -I`` process (isolated mode: no environment variables, no
user site-packages, the script's folder is not on ``sys.path``) with:

* a **bounded lifetime**: ``run_program`` returns within ``timeout_s`` + 1 s whatever the program
  does, and when it returns, every process the program started is dead. The program runs in a fresh
  **PID namespace** (``unshare --pid --fork --kill-child --mount-proc``) whose init (PID 1) is a
  small trusted launcher (``LAUNCHER``): it starts the program, reaps what is reparented to it and
  exits with the program's status as soon as the program exits; the kernel then SIGKILLs everything
  else in the namespace, whatever it did (fork, ``setsid``, double fork, ``chdir``, closed or kept
  pipes, ignored signals: SIGKILL cannot be ignored, and a namespace cannot be left). Past the
  timeout we SIGKILL the launcher (found as unshare's child) and wait for unshare, which returns only
  once the namespace is empty (short of a process stuck in an uninterruptible kernel wait outlasting
  the grace: then we return on time and the kernel finishes the job); the launcher also dies with unshare (``--kill-child``) and kills itself
  half a second after the timeout should we fail to. Output never goes through a pipe (stderr goes
  to an unlinked temp file read after the end), so no descendant can stall us by holding one open.
  Without PID namespaces (``isolation().pid_namespace`` false, said by ``describe()``) it is best
  effort: the process group is SIGKILLed (at the timeout, and on exit to take leftovers with it),
  plus processes still in the temp dir; a child that left both (``setsid`` and ``chdir``) survives,
  though we still return on time;
* **resource limits** (``setrlimit``): address space (``RLIMIT_AS``, default 1 GiB, so a memory bomb
  gets ``MemoryError`` instead of taking the machine), CPU seconds (``RLIMIT_CPU``), file size
  (``RLIMIT_FSIZE``, 16 MiB per file), open files (``RLIMIT_NOFILE``), processes (``RLIMIT_NPROC``)
  and no core dumps;
* a **private temporary directory** as its working directory and ``HOME``/``TMPDIR``, deleted
  afterwards, and an environment with nothing but ``PATH``;
* **no network**: when ``unshare`` can create a network namespace (root, or unprivileged user
  namespaces), the process runs in a fresh one that has only a downed loopback, so every connect
  fails (``ENETUNREACH``), including to servers on the host's 127.0.0.1;
* **an unprivileged user** when we run as root: the launcher (root inside the namespaces, so the
  program cannot signal or trace it) drops the program to uid/gid 65534 (nobody) with no
  supplementary groups (without a PID namespace, ``unshare --setuid/--setgid`` does), so the program
  cannot write outside its temp dir or world-writable places, cannot signal our processes, and
  ``RLIMIT_NPROC`` is enforced (the kernel does not enforce it for root).

What it does **not** stop (it is not a container or VM): reading any file the unprivileged user can
read (e.g. world-readable files under /etc or the repo), writing to world-writable directories
such as /tmp (bounded per file by ``RLIMIT_FSIZE``), using CPU up to the limits, any system call
(there is no seccomp filter), asking a host service over a Unix socket to run something for it
(that process is outside the namespace), and kernel exploits. Without ``unshare`` (a container that
forbids namespaces), there is no network isolation beyond a Python-level guard that replaces
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
import time
from dataclasses import dataclass
from typing import IO, NamedTuple

NOBODY = 65534
GiB = 1 << 30
GRACE_S = 1.0  # run_program returns at most this long after the timeout
INIT_GRACE_S = 0.5  # the launcher kills its namespace this long after the timeout, if we have not
CLEANUP_S = 0.2  # of GRACE_S, kept for reading stderr and deleting the temp dir

# Prepended when no network namespace is available: best effort, documented above as bypassable.
SOCKET_GUARD = ("import socket as _s\n"
                "def _no_net(*a, **k):\n"
                "    raise PermissionError('network access is disabled in the idlm sandbox')\n"
                "_s.socket = _s.create_connection = _s.socket_pair = _no_net\n"
                "del _s, _no_net\n")

# PID 1 of the program's PID namespace (``python -I -c LAUNCHER USER DEADLINE_S PROGRAM...``; USER -1
# keeps ours): starts the program as USER, reaps orphans reparented to it, and exits with the
# program's status (128 + signal, with a line on stderr, if a signal killed it). Its exit makes the
# kernel kill the rest of the namespace. As PID 1 it only receives signals it handles (and SIGKILL
# from outside), so SIGALRM, its own deadline, is the only one it handles.
LAUNCHER = """\
import os, signal, sys
user, deadline, cmd = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]

def expire(signo, frame):
    os.write(2, b'killed by the sandbox init at its deadline\\n')
    os._exit(124)

signal.signal(signal.SIGALRM, expire)
signal.setitimer(signal.ITIMER_REAL, deadline)
child = os.fork()
if child == 0:
    try:
        if user >= 0:
            os.setgroups([])
            os.setgid(user)
            os.setuid(user)
        os.execv(cmd[0], cmd)
    except BaseException as e:
        os.write(2, ('sandbox init: cannot start the program: %r\\n' % (e,)).encode())
    os._exit(127)
while True:
    pid, status = os.waitpid(-1, 0)
    if pid == child:
        break
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = 'signal %d' % sig
    os.write(2, ('killed by %s\\n' % name).encode())
    os._exit(128 + sig)
os._exit(os.WEXITSTATUS(status))
"""


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0  # wall clock, then SIGKILL to the PID namespace (or the process group)
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
    returncode: int | None  # None on timeout; a signal is 128 + signo with a PID namespace, else -signo


class Isolation(NamedTuple):
    prefix: tuple[str, ...]  # the unshare command the interpreter runs under; () = none
    python: str  # the interpreter for programs
    pid_namespace: bool  # prefix makes a PID namespace whose init is LAUNCHER: lifetime bounded
    as_nobody: bool  # the program runs as NOBODY (dropped by LAUNCHER, or by unshare without one)


@functools.lru_cache(maxsize=1)
def isolation() -> Isolation:
    """What isolates a program best here, probed once: ``unshare`` with PID and network namespaces
    and nobody's uid when root (with an interpreter nobody may run: ours may live under a private
    home, so the system ``python3`` is the fallback; HumanEval needs only the standard library), then
    the same without a PID namespace, then as the current user (in a user namespace when not root),
    or nothing."""
    exe = shutil.which("unshare")
    pythons = [sys.executable] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                                  if p != sys.executable and os.path.exists(p)]
    pid_ns = ("--pid", "--fork", "--kill-child", "--mount-proc")
    drop = (f"--setgid={NOBODY}", f"--setuid={NOBODY}")
    candidates = []
    if exe is not None:
        if os.geteuid() == 0:
            candidates += [Isolation((exe, "--net", *pid_ns), py, True, True) for py in pythons]
            candidates += [Isolation((exe, "--net", *drop), py, False, True) for py in pythons]
            candidates += [Isolation((exe, "--net", *pid_ns), sys.executable, True, False),
                           Isolation((exe, "--net"), sys.executable, False, False)]
        candidates += [Isolation((exe, "--net", "--map-root-user", *pid_ns), sys.executable, True, False),
                       Isolation((exe, "--net", "--map-root-user"), sys.executable, False, False)]
    for iso in candidates:
        try:
            r = subprocess.run(sandbox_command(iso, ["-c", "pass"], 30.0), check=False, capture_output=True,
                               timeout=30, cwd="/")
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return iso
    return Isolation((), sys.executable, False, False)


def sandbox_command(iso: Isolation, args: list[str], timeout_s: float) -> list[str]:
    """The command line that runs ``python -I *args`` under ``iso`` (through LAUNCHER, which gives up
    ``INIT_GRACE_S`` after ``timeout_s``, when there is a PID namespace)."""
    program = [iso.python, "-I", *args]
    if not iso.pid_namespace:
        return [*iso.prefix, *program]
    user = NOBODY if iso.as_nobody else -1
    return [*iso.prefix, iso.python, "-I", "-c", LAUNCHER, str(user), f"{timeout_s + INIT_GRACE_S:g}", *program]


def describe() -> str:
    """One line: what isolation applies on this machine."""
    iso = isolation()
    lifetime = ("PID namespace (every process it starts is killed when it ends)" if iso.pid_namespace else
                "no PID namespace (only its process group and processes in its temp dir are killed: "
                "a detached child can outlive it)")
    if not iso.prefix:
        return f"no namespaces available: rlimits + private temp dir + Python-level socket guard only, {lifetime}"
    user = "as nobody" if iso.as_nobody else "as the current user"
    return f"network namespace (no network), {lifetime}, {user}, rlimits, private temp dir ({iso.python})"


def network_isolated() -> bool:
    return bool(isolation().prefix)


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
    """Run ``source`` as a Python program under the limits above; passed = exit status 0. Returns
    within ``timeout_s`` + ``GRACE_S`` (after the one-time ``isolation()`` probe), and, given a PID
    namespace, only once every process the program started is gone."""
    lim = limits or Limits(timeout_s=timeout_s)
    iso = isolation()
    start = time.monotonic()
    work = tempfile.mkdtemp(prefix="idlm-sandbox-")
    try:
        path = _write_program(work, limits_prelude(lim) + ("" if iso.prefix else SOCKET_GUARD) + source, iso)
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1"}
        with tempfile.TemporaryFile(prefix="idlm-sandbox-stderr-") as err:
            proc = subprocess.Popen(sandbox_command(iso, [path], lim.timeout_s), cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
            finished = _wait(proc, start + lim.timeout_s)
            if not finished:
                _kill_sandbox(proc, iso)
            elif not iso.pid_namespace:
                _kill_group(proc)  # leftovers in its process group
            _wait(proc, start + lim.timeout_s + GRACE_S - CLEANUP_S)  # a PID namespace is empty once unshare exits
            detail = _tail(err)
    finally:
        if not iso.pid_namespace:
            _kill_leftovers(work)
        shutil.rmtree(work, ignore_errors=True)
    if not finished:
        return ExecResult(False, "timeout", f"killed after {lim.timeout_s:g} s wall clock", None)
    if proc.returncode == 0:
        return ExecResult(True, "passed", "", 0)
    if proc.returncode < 0:
        detail = f"killed by {signal.Signals(-proc.returncode).name}. {detail}".strip()
    return ExecResult(False, "failed", detail, proc.returncode)


def _write_program(work: str, source: str, iso: Isolation) -> str:
    path = os.path.join(work, "program.py")
    with open(path, "w") as f:
        f.write(source)
    if iso.as_nobody:
        os.chown(work, NOBODY, NOBODY)
        os.chown(path, NOBODY, NOBODY)
    return path


def _wait(proc: subprocess.Popen, deadline: float) -> bool:
    """Wait for ``proc`` until the ``time.monotonic()`` deadline; whether it exited."""
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return False
    return True


def _kill_sandbox(proc: subprocess.Popen, iso: Isolation) -> None:
    """SIGKILL the program and all it started: with a PID namespace, its init (unshare's child, still
    unreaped while unshare lives, so its pid is not reused), after which unshare exits once the
    kernel has emptied the namespace; else (or if unshare has not forked yet) the process group."""
    inits = _children(proc.pid) if iso.pid_namespace else []
    for pid in inits:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not inits:
        _kill_group(proc)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _tail(f: IO[bytes], limit: int = 2000) -> str:
    """The last ``limit`` characters of a file the program wrote (it may be up to RLIMIT_FSIZE)."""
    size = f.seek(0, os.SEEK_END)
    f.seek(max(0, size - 4 * limit))
    return f.read().decode("utf-8", "replace").strip()[-limit:]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_leftovers(work: str) -> None:
    """Without a PID namespace: children the program forked into their own session survive the
    group kill; find those still in our private temp dir and kill them too (best effort)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd").startswith(work):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue
