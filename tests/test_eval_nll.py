"""`idlm eval nll`: response NLL under the clean causal path equals transformers' loss on the same
tokens; the command compares models side by side and rejects bad input with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from idlm.cli import main
from idlm.eval.nll import response_nll
from idlm.model import load_folder
from idlm.train.batch import Sample

from .train.conftest import make_tiny_folder, toy_records


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_folder(tmp_path_factory.mktemp("tiny_nll"), seed=3)


def test_nll_matches_transformers_loss(folder: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    records = toy_records(4, seed=5)
    samples = [Sample(tuple(r["prompt_ids"]), tuple(r["response_ids"])) for r in records]
    total, count, agree = 0.0, 0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([list(s.prompt_ids + s.response_ids)])
            labels = ids.clone()
            labels[0, : len(s.prompt_ids)] = -100  # score the response only
            out = hf(ids, labels=labels)
            n = len(s.response_ids)
            total += out.loss.item() * n
            count += n
            agree += int((out.logits[0, len(s.prompt_ids) - 1:-1].argmax(-1) == ids[0, len(s.prompt_ids):]).sum())
    res = response_nll(load_folder(folder), samples)
    assert res.tokens == count and res.samples == 4
    assert res.nll == pytest.approx(total / count, rel=1e-5)
    assert res.top1 == pytest.approx(agree / count)


def test_eval_nll_command(folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_records(3)))
    assert main(["eval", "--task", "nll", "--models", str(folder), str(folder), "--data", str(data), "--threads", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    a, b = out["results"]
    assert a["nll"] == b["nll"] > 0 and b["nll_vs_first"] == 0.0 and a["samples"] == 3
    assert main(["eval", "--task", "nll", "--models", str(folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("idlm: error:")


def test_eval_nll_scores_each_quantization_side_by_side(folder: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in toy_records(3)))
    assert main(["eval", "--task", "nll", "--models", str(folder), "--quants", "none,int8,int4", "--data", str(data),
                 "--threads", "1"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [(r["dtype"], r["quant"]) for r in rows] == [("fp32", "none"), ("fp32", "int8"), ("fp32", "int4")]
    ref = rows[0]["nll"]
    for r in rows[1:]:  # quantized weights: a different network, close to the dense one
        assert r["nll"] != ref and abs(r["nll"] / ref - 1) < 0.1, r
    assert main(["eval", "--task", "nll", "--models", str(folder), "--quants", "int3", "--data", str(data)]) == 2
    assert "--quants takes a comma list" in capsys.readouterr().err
