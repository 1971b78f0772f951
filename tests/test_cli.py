"""The `idlm` command: bad input gives one error line and exit 2; generate/verify/bench print what they promise."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from idlm.cli import main

from .model.test_loading import _write_gguf


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "idlm.cli", *args], capture_output=True, text=True, timeout=600,
                          check=False)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--stride", "9"], "--stride must be an integer in 2..8"),
    (["generate", "--prompt", "hi", "--stride", "1"], "--stride must be an integer in 2..8"),
    (["generate", "--prompt", "hi", "--temperature", "-0.5"], "--temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-k", "-3"], "--top-k must be an integer >= 0"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be"),
    (["generate", "--prompt", "hi", "--model", "/no/such/model"], "model not found"),
    (["bench", "--modes", "ar,xyz"], "--modes takes a comma list"),
    (["verify", "--prompts", "0"], "--prompts must be in"),
    (["generate", "--prompt", "hi", "--tree", "9"], "--tree must be an integer in 0..7"),
    (["bench", "--modes", "isd", "--tree", "0,x"], "--tree takes a comma list"),
    (["serve", "--tree", "-1"], "--tree must be an integer in 0..7"),
    (["data", "prompts", "--out", "p.jsonl", "--count", "0"], "--count, --batch-size and --max-tokens must be >= 1"),
    (["convert", "--data", "x.jsonl", "--out", "o", "--sharding", "zero3"], "--sharding must be one of"),
    (["convert", "--data", "x.jsonl", "--out", "o", "--sharding", "fsdp"], "needs several processes"),
    (["export", "o", "--to", "vllm", "--model", "/no/such"], "is not an `idlm convert` output folder"),
    (["generate", "--prompt", "hi", "--draft-vocab", "-3"], "--draft-vocab must be >= 0"),
    (["generate", "--prompt", "hi", "--draft-vocab", "lots"], "--draft-vocab takes auto, full or a token count"),
    (["serve", "--draft-vocab", "x"], "--draft-vocab takes auto, full or a token count"),
    (["generate", "--prompt", "hi", "--model", "smollm2-135m-instruct", "--draft-vocab", "100"],
     "has no draft_vocab.json"),
    (["data", "vocab", "/no/such.jsonl", "--out", "v.json", "--default-k", "0"], "--default-k must be >= 1"),
])
def test_bad_input_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idlm: error:") and message in err[0]


def test_nan_rejected_by_parser(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "hi", "--temperature", "nan"])
    assert e.value.code == 2
    assert "must be finite" in capsys.readouterr().err
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["generate", "bench", "verify", "eval", "serve"])
def test_unknown_quant_is_rejected_by_the_parser(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--quant", "int3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--quant: invalid choice: 'int3'" in err and "Traceback" not in err


def test_unsupported_gguf_is_one_line(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "m.gguf", "gpt2")
    r = run_cli(["generate", "--prompt", "hi", "--model", str(path)])
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("idlm: error: GGUF architecture 'gpt2' is not supported")


def test_help_explains() -> None:
    r = run_cli(["generate", "--help"])
    assert r.returncode == 0 and "--stride" in r.stdout and "2..8" in r.stdout


def test_generate_json_on_default_model() -> None:
    # the demo's prompt: the bare question's first token is a near tie ("The" / "L", 0.08 logits apart in fp32)
    # that a quantization may flip, after which this 135M model rambles
    r = run_cli(["generate", "--prompt", "What is the capital of France? Answer in one sentence.", "--chat",
                 "--json", "--stride", "3",
                 "--max-new-tokens", "12", "--dtype", "fp32", "--threads", "2"])
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("text", "tokens", "forwards", "tpf", "tokens_per_s", "mode", "stride"):
        assert key in rec
    assert rec["mode"] == "isd" and rec["stride"] == 3
    assert "Paris" in rec["text"]
    assert rec["tpf"] == pytest.approx(rec["tokens"] / rec["forwards"], abs=1e-3)


def test_verify_prints_fraction_last() -> None:
    r = run_cli(["verify", "--stride", "3", "--prompts", "2", "--max-new-tokens", "24", "--threads", "2"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1] == "1"


def test_bench_ends_with_json_line(tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hello.\nName a color.\nCount to three.\n")
    r = run_cli(["bench", "--modes", "ar,isd,ar-b1,hf", "--stride", "2,3", "--concurrency", "1,2", "--prompts", "3",
                 "--prompt-file", str(prompts), "--max-new-tokens", "8", "--threads", "2", "--dtype", "fp32",
                 "--kv-cache-gb", "0.1", "--plots", str(tmp_path / "plots")])
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    from PIL import Image

    for name in ("throughput_vs_concurrency", "acceptance_per_position", "tpf_vs_stride"):
        img = Image.open(tmp_path / "plots" / f"{name}.png").convert("L")
        lo, hi = img.getextrema()
        assert img.size[0] > 300 and hi - lo > 100  # drawn, not blank
    runs = [(x["mode"], x["stride"], x["concurrency"]) for x in rec["results"]]
    assert runs == [("ar", 1, 1), ("isd", 2, 1), ("isd", 3, 1), ("ar-b1", 1, 1), ("hf", 1, 1),
                    ("ar", 1, 2), ("isd", 2, 2), ("isd", 3, 2)]
    for x in rec["results"]:
        assert set(x) >= {"total_tokens_per_s", "per_request_tokens_per_s", "tpf", "latency_p50_s", "latency_p90_s",
                          "identical", "tokens", "forwards"}
        assert x["tokens"] > 0 and x["latency_p90_s"] >= x["latency_p50_s"] > 0
        if x["mode"] != "hf":  # the engine at any concurrency reproduces the batch-1 AR decoder
            assert x["identical"] == 1.0, x
    ar = rec["results"][0]
    assert ar["tpf"] == 1.0 and ar["tokens"] == rec["results"][4]["tokens"]  # same greedy length as transformers
    assert "gsm8k" not in ar  # a prompt file is not scored


@pytest.mark.slow  # ~50 s; test_bench_ends_with_json_line covers the command in the default run
def test_bench_scores_the_gsm8k_slice(tmp_path: Path) -> None:
    r = run_cli(["bench", "--modes", "ar,isd", "--prompts", "2", "--max-new-tokens", "8", "--threads", "2",
                 "--kv-cache-gb", "0.1", "--plots", ""])
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    ar, isd = rec["results"]
    assert set(ar["gsm8k"]) == {"strict", "flexible"} and ar["gsm8k"] == isd["gsm8k"]  # identical outputs


def test_bench_llamacpp_without_the_package_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    from idlm.eval import bench

    monkeypatch.setattr(bench, "llamacpp_available", lambda: False)
    assert main(["bench", "--modes", "ar,llamacpp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs llama-cpp-python: pip install '.[compare]'" in err[0]


def test_bench_llamacpp_runs_the_same_gguf_and_prompt_ids(tmp_path: Path) -> None:
    """The llama.cpp peer (``pip install '.[compare]'``) on the default GGUF: same prompt ids, greedy. Its
    kernels are not ours, so long outputs part after a while; a short plain factual answer is the same."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install '.[compare]')")
    prompts = tmp_path / "p.txt"
    prompts.write_text("What is the capital of France? Answer in one sentence.\n")
    r = run_cli(["bench", "--modes", "ar,llamacpp", "--prompts", "1", "--prompt-file", str(prompts),
                 "--max-new-tokens", "6", "--threads", "2", "--quant", "int4", "--kv-cache-gb", "0.1", "--plots", ""])
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["quant"] == "int4"
    ar, cpp = rec["results"]
    assert ar["mode"] == "ar" and ar["identical"] == 1.0
    assert cpp["mode"] == "llamacpp" and cpp["tokens"] == 6 and cpp["total_tokens_per_s"] > 0
    assert "llamacpp" in r.stdout
    assert cpp["identical"] == 1.0  # the same six greedy tokens as idlm int4 AR on a plain factual answer
