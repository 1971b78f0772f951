"""`idlm eval` in process and against a running `idlm serve` give the same per-example outputs; the
in-process --compare ar check; records and the final JSON line; bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from idlm.cli import main


@pytest.fixture(scope="module")
def gsm8k_file(tmp_path_factory) -> Path:
    from idlm.eval.prompts import gsm8k_path

    f = tmp_path_factory.mktemp("gsm") / "gsm8k-mini.jsonl"
    f.write_text("".join(gsm8k_path("test").read_text().splitlines(keepends=True)[:5]))
    return f


def _run(capsys, *argv) -> tuple[int, dict]:
    rc = main(list(argv))
    out = capsys.readouterr().out.strip().splitlines()
    return rc, json.loads(out[-1])


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_in_process_compare_ar(tiny_chat_model, gsm8k_file, tmp_path, capsys):
    rec = tmp_path / "r.jsonl"
    rc, s = _run(capsys, "eval", "--task", "gsm8k", "--data", str(gsm8k_file), "--model", str(tiny_chat_model),
                 "--max-new-tokens", "24", "--compare", "ar", "--concurrency", "3", "--records", str(rec),
                 "--threads", "1", "--dtype", "fp32")
    assert rc == 0 and s["task"] == "gsm8k" and s["mode"] == "isd" and s["stride"] == 3 and s["n"] == 5
    assert s["compare"]["identical"] == 1.0 and s["compare"]["mode"] == "ar"
    assert s["tokens"] == sum(r["tokens"] for r in _records(rec)) and s["forwards"] >= 1
    isd, ar = _records(rec), _records(tmp_path / "r-ar.jsonl")
    assert [r["id"] for r in isd] == [f"gsm8k-mini-{i}" for i in range(5)]
    assert [r["output"] for r in isd] == [r["output"] for r in ar]
    assert all(set(r["score"]) == {"strict", "flexible"} and r["tokens"] <= 24 for r in isd)
    assert all(r["forwards"] == r["tokens"] for r in ar)


def test_server_outputs_equal_in_process(server, tiny_chat_model, gsm8k_file, tmp_path, capsys):
    common = ["eval", "--task", "gsm8k", "--data", str(gsm8k_file), "--max-new-tokens", "24", "--concurrency", "2"]
    rc, local = _run(capsys, *common, "--model", str(tiny_chat_model), "--threads", "1", "--dtype", "fp32",
                     "--records", str(tmp_path / "local.jsonl"))
    assert rc == 0
    rc, remote = _run(capsys, *common, "--server", server.url, "--records", str(tmp_path / "remote.jsonl"),
                      "--compare", "ar")
    assert rc == 0 and remote["where"] == server.url and remote["errors"] == 0
    assert remote["compare"]["errors"] == 0 and remote["compare"]["identical"] == 1.0
    a, b = _records(tmp_path / "local.jsonl"), _records(tmp_path / "remote.jsonl")
    assert [r["output"] for r in a] == [r["output"] for r in b]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert all(r["forwards"] is not None for r in b)  # idlm reports its forwards per choice
    assert local["score"] == remote["score"]


def test_humaneval_over_http_with_stop_strings(server, tmp_path, capsys):
    rc, s = _run(capsys, "eval", "--task", "humaneval", "--limit", "2", "--max-new-tokens", "16",
                 "--server", server.url, "--records", str(tmp_path / "h.jsonl"))
    assert rc == 0 and s["n"] == 2 and s["metric"] == "pass@1" and s["score"] == 0.0  # a random model
    assert all(r["detail"] for r in _records(tmp_path / "h.jsonl"))


@pytest.mark.parametrize("argv,msg", [
    (["--task", "gsm8k", "--data", "/nonexistent.jsonl"], "no such file"),
    (["--task", "gsm8k", "--concurrency", "0"], "--concurrency"),
    (["--task", "gsm8k", "--stride", "9"], "stride"),
    (["--task", "nll"], "--data"),
    (["--task", "gsm8k", "--server", "http://127.0.0.1:9"], "no OpenAI-compatible server"),
])
def test_bad_input_is_one_line(argv, msg, capsys):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idlm: error:") and msg in err[0]
