"""lm-eval's `local-completions` backend against `idlm serve`: a loglikelihood (multiple-choice) task
and a generate-until task, both from local JSONL task definitions (no hub access). The harness uses
the server's own tokenizer routes (/tokenizer_info, /tokenize, /detokenize)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import Served

pytest.importorskip("lm_eval", reason="lm-eval is a dev dependency (pip install -e '.[dev]')")

DOCS = [{"question": "The sky is", "choices": ["blue", "green", "loud"], "answer": 0, "target": "blue"},
        {"question": "Two plus two is", "choices": ["four", "seven"], "answer": 0, "target": "four"},
        {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Kelvin"], "answer": 0,
         "target": "Celsius"},
        {"question": "The opposite of hot is", "choices": ["cold", "tall", "fast"], "answer": 0, "target": "cold"}]


def _tasks(folder: Path) -> Path:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
    (folder / "ll.yaml").write_text(f"""task: idlm_local_ll
{common}output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (folder / "gen.yaml").write_text(f"""task: idlm_local_gen
{common}output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 12
metric_list:
  - metric: exact_match
""")
    return folder


def _loglikelihood(folder: Path, context: str, continuation: str) -> float:
    """What the harness should get: sum of log p(continuation tokens | context), causal, fp32."""
    import torch
    from transformers import AutoTokenizer

    from idlm.model import load_model

    tok = AutoTokenizer.from_pretrained(str(folder))
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    lm = load_model(str(folder), dtype=torch.float32)
    with torch.inference_mode():
        lp = torch.log_softmax(lm.model.forward(torch.tensor([whole]), torch.arange(len(whole))[None])[0], -1)
    return float(sum(lp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


def test_lm_eval_local_completions(server: Served, tmp_path: Path, tiny_chat_model: Path) -> None:
    tasks = _tasks(tmp_path)
    model = json.loads(__import__("httpx").get(server.url + "/v1/models").text)["data"][0]["id"]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
           (f"model={model},base_url={server.url}/v1/completions,num_concurrent=2,max_retries=1,"
           "tokenized_requests=True,tokenizer_backend=remote"),
           "--tasks", "idlm_local_ll,idlm_local_gen", "--include_path", str(tasks), "--output_path", str(out),
           "--log_samples"]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = next(out.rglob("results_*.json"))
    res = json.loads(results.read_text())["results"]
    assert 0.0 <= res["idlm_local_ll"]["acc,none"] <= 1.0
    assert 0.0 <= res["idlm_local_gen"]["exact_match,none"] <= 1.0
    samples = [json.loads(line) for f in out.rglob("samples_idlm_local_ll*.jsonl") for line in f.read_text().splitlines()]
    assert len(samples) == len(DOCS)
    first = next(x for x in samples if x["doc_id"] == 0)
    got = float(first["resps"][0][0][0])  # log-likelihood of "The sky is" -> " blue", from the server
    assert got == pytest.approx(_loglikelihood(tiny_chat_model, "The sky is", " blue"), abs=1e-3)
