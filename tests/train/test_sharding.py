"""Sharded conversion: FSDP2 over 2 CPU processes (gloo) trains, checkpoints one shard per rank, resumes,
exports one HF folder / adapter, and ends where a 1-process run of the same micro-batches ends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from idlm.train.config import ConvertConfig
from idlm.train.sharding import Sharding, choose_sharding

ROOT = Path(__file__).resolve().parents[2]


def _accelerate_env(config: Path, processes: int) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes",
                                                str(processes), "unused.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture
def clean_env(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(k)
    return monkeypatch


def test_choose_sharding_follows_flag_and_accelerate_configs(clean_env):
    assert choose_sharding("auto", 1) == Sharding()
    assert choose_sharding("auto", 2) == Sharding("ddp")
    assert choose_sharding("fsdp", 2) == Sharding("fsdp", reshard_after_forward=True)
    assert choose_sharding("fsdp-grad-op", 2) == Sharding("fsdp", reshard_after_forward=False)
    with pytest.raises(ValueError, match="needs several processes"):
        choose_sharding("fsdp", 1)
    with pytest.raises(ValueError, match="--sharding must be one of"):
        ConvertConfig(data=("x",), out="o", sharding="zero3")
    examples = ROOT / "examples" / "accelerate"
    want = {"fsdp2_8gpu.yaml": Sharding("fsdp", True), "fsdp2_zero2_8gpu.yaml": Sharding("fsdp", False),
            "ddp_8gpu.yaml": Sharding("ddp")}
    for name, sharding in want.items():
        env = _accelerate_env(examples / name, 8)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            assert choose_sharding("auto", 8) == sharding, name
    clean_env.setenv("ACCELERATE_USE_FSDP", "true")
    clean_env.setenv("FSDP_VERSION", "1")
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        choose_sharding("auto", 2)


def _convert(args: list[str], out: Path, procs: int = 1, env: dict[str, str] | None = None) -> list[dict]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
                if procs > 1 else [sys.executable])
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})
    run = subprocess.run([*launcher, "-m", "idlm.cli", "convert", *args, "--out", str(out)], check=False,
                         env=full_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from idlm.train import load_converted

    model = load_converted(folder).loaded.model
    gate = (ids == model.cfg.mask_token_id).float()  # adapters (lora) act on the MASK slots
    with torch.no_grad():
        return model(ids, torch.arange(len(ids)), gate=gate)


@pytest.mark.parametrize("mode,launch", [pytest.param("full", "flag", marks=pytest.mark.slow),  # ~30 s each
                                         ("lora", "accelerate")])
def test_fsdp_two_processes_checkpoint_resume_export_match_one_process(tiny_folder, toy_data, tmp_path,
                                                                       mode, launch):
    common = ["--data", str(toy_data), "--model", str(tiny_folder), "--mode", mode, "--stages", "3:4",
              "--lr", "1e-2", "--row-tokens", "64", "--max-len", "64", "--precision", "fp32", "--lora-rank", "8",
              "--lora-alpha", "16", "--no-progress", "--save-every", "2"]
    if launch == "flag":
        shard, env = ["--sharding", "fsdp"], None
    else:  # what `accelerate launch --config_file examples/accelerate/fsdp2_zero2_8gpu.yaml` passes on
        shard, env = [], _accelerate_env(ROOT / "examples/accelerate/fsdp2_zero2_8gpu.yaml", 2)
        env["ACCELERATE_MIXED_PRECISION"] = "no"
    two = tmp_path / "two"
    first = _convert([*common, *shard, "--stop-at", "2"], two, procs=2, env=env)
    ckpt = two / "checkpoint"
    assert sorted(p.name for p in (ckpt / "sharded").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((ckpt / "state.json").read_text())["state"]["step"] == 2
    assert [r["step"] for r in first] == [1, 2]
    resumed = _convert([*common, *shard, "--resume"], two, procs=2, env=env)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    one = _convert([*common, "--grad-accum", "2"], tmp_path / "one")  # the same rows, one process
    torch.testing.assert_close(torch.tensor([r["loss"] for r in resumed]),
                               torch.tensor([r["loss"] for r in one]), atol=1e-5, rtol=1e-5)
    mask = json.loads((two / "idlm_convert.json").read_text())["mask_token_id"]
    ids = torch.tensor([5, 17, 3, 99, mask, mask, 42, mask])
    trained, reference = _logits(two, ids), _logits(tmp_path / "one", ids)
    torch.testing.assert_close(trained, reference, atol=1e-4, rtol=1e-4)
    assert resumed[-1]["loss"] < 0.9 * resumed[0]["loss"]  # it trained
