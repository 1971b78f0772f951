"""Hard kills during ``idlm convert``: the real CLI in a subprocess is SIGKILLed several times in a row
(inside training steps, and inside checkpoint writes through the ``IDLM_TEST_PAUSE`` hook of
``idlm/train/loop.py``), resumed with ``--resume`` each time, and must end bit for bit where an
uninterrupted run with the same seed and settings ends. After every kill the checkpoint on disk must
load (or there must be none yet).

Determinism is promised for one machine and one thread (``--threads 1``), and that is what is checked.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idlm.model.kernels import pytorch_kernels
from idlm.train import ConvertConfig, run_convert

STEPS, EVERY = 12, 2  # optimizer steps (two curriculum stages) and checkpoint interval
SETTINGS = {"stages": "2:6,3:6", "row_tokens": 64, "max_len": 64, "batch_rows": 2, "grad_accum": 2,
            "save_every": EVERY, "precision": "fp32", "lora_rank": 8, "lora_alpha": 16.0, "threads": 1,
            "warmup_ratio": 0.2, "weight_decay": 0.01}
ROOT = Path(__file__).resolve().parents[2]


def _settings(tiny_folder: Path, toy_data: Path, mode: str, seed: int) -> dict:
    return {**SETTINGS, "data": (str(toy_data),), "model": str(tiny_folder), "mode": mode, "seed": seed,
            "lr": 3e-3 if mode == "full" else 1e-2}


def _argv(settings: dict, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "idlm.cli", "convert", "--out", str(out), "--no-progress", "--resume"]
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}", *(value if isinstance(value, tuple) else [str(value)])]
    return argv


def _logged(out: Path) -> list[dict]:
    """The complete records of train_log.jsonl (a killed run may leave a partial last line)."""
    path = out / "train_log.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().split("\n")[:-1]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _killed_run(argv: list[str], out: Path, kill: tuple, env_extra: dict[str, str]) -> None:
    """Start the CLI and SIGKILL it: ("step", k, delay) = ``delay`` s after the log shows step k;
    (phase, s, 0.0) = while the checkpoint of step s stops at ``phase`` (loop.py's test hook)."""
    kind, at, delay = kill
    ready = out.parent / f"paused-{kind}-{at}"
    env = {**os.environ, **env_extra}
    if kind != "step":
        env["IDLM_TEST_PAUSE"] = f"{kind}:{at}:{ready}"
    with open(out.parent / "stderr.txt", "ab") as err:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline, hit = time.monotonic() + 120, False
    try:
        while not hit and proc.poll() is None and time.monotonic() < deadline:
            hit = any(r["step"] >= at for r in _logged(out)) if kind == "step" else ready.exists()
            time.sleep(delay if hit else 0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
    tail = (out.parent / "stderr.txt").read_text()[-2000:]
    assert hit and rc == -signal.SIGKILL, f"kill {kill} missed (exit status {rc})\n{tail}"


def _checkpoint_on_disk(out: Path, names: set[str]) -> int:
    """The step of the checkpoint on disk (0 = none), after checking that it and the export load."""
    state = out / "checkpoint" / "state.pt"
    if not state.exists():
        assert not (out / "idlm_convert.json").exists()
        return 0
    blob = torch.load(state, map_location="cpu", weights_only=False)
    step = blob["state"]["step"]
    assert step % EVERY == 0 or step == STEPS
    assert set(blob["params"]) == names and len(blob["optimizer"]["state"]) == len(names)
    if (out / "idlm_convert.json").exists():  # the export's files are whole too (each may be a step behind)
        assert json.loads((out / "idlm_convert.json").read_text())["steps"] <= step
        for name in ("model.safetensors", "adapter.safetensors"):
            if (out / name).exists():
                load_file(str(out / name))
        for name in ("config.json", "generation_config.json"):
            if (out / name).exists():
                json.loads((out / name).read_text())
    return step


def _plan(seed: int) -> list[tuple]:
    """Three kills: first while the first checkpoint is being written (its state in the temporary file,
    not yet renamed: the resumed run finds no checkpoint, but a log), then in a seeded order one at a
    seeded moment after a seeded training step and one between a checkpoint's state and its export.
    Hook steps are picked when their turn comes."""
    rng = random.Random(seed)
    rest = [("step", rng.randrange(1, 1 + EVERY), rng.uniform(0.0, 0.05)),
            ("export", rng.randrange(1, 1 + EVERY), 0.0)]
    rng.shuffle(rest)
    return [("state", 1, 0.0), *rest]


@pytest.mark.parametrize("mode,seed", [pytest.param("full", 11, marks=pytest.mark.slow), ("lora", 12)])  # ~24 s each
def test_sigkilled_convert_resumes_to_the_uninterrupted_weights(tiny_folder, toy_data, tmp_path, mode, seed):
    settings = _settings(tiny_folder, toy_data, mode, seed)
    threads = torch.get_num_threads()
    try:  # the uninterrupted run (in this process: the same code, settings, thread count and kernels)
        with pytorch_kernels():
            ref = run_convert(ConvertConfig(**settings, out=str(tmp_path / "ref"), progress=False))
    finally:
        torch.set_num_threads(threads)
    ref_ckpt = torch.load(tmp_path / "ref" / "checkpoint" / "state.pt", weights_only=False)
    names = set(ref_ckpt["params"])

    out, argv = tmp_path / "killed", _argv(settings, tmp_path / "killed")
    # PyTorch's kernels (the LoRA path's no-grad clean half would run idlm's native ones, built on first
    # use): a kernel build costs no time here, and every process rounds alike
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "IDLM_NATIVE": "0"}
    done, landed = 0, []
    for kind, offset, delay in _plan(seed):
        logged = max((r["step"] for r in _logged(out)), default=0)
        if kind == "step":  # `delay` s after a step past anything the log holds from earlier runs
            kill = ("step", min(logged + offset, STEPS - 1), delay)
        else:  # a checkpoint this run will write (the last one included)
            kill = (kind, min(done + offset * EVERY, STEPS), 0.0)
        _killed_run(argv, out, kill, env)
        step = _checkpoint_on_disk(out, names)
        if kind == "state":  # the unfinished state never replaced the previous checkpoint
            assert step == kill[1] - EVERY
        elif kind == "export":
            assert step == kill[1]
        assert step >= done
        done = step
        landed.append((kill, step, max((r["step"] for r in _logged(out)), default=0)))

    run = subprocess.run(argv, check=False, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1])["steps"] == STEPS

    weights = "model.safetensors" if mode == "full" else "adapter.safetensors"
    a, b = load_file(str(tmp_path / "ref" / weights)), load_file(str(out / weights))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), ([k for k in a if not torch.equal(a[k], b[k])], landed)
    assert (json.loads((out / "idlm_convert.json").read_text())
            == json.loads((tmp_path / "ref" / "idlm_convert.json").read_text()))
    ckpt = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert ckpt["state"]["step"] == STEPS and ckpt["state"]["seq_tokens"] == ref_ckpt["state"]["seq_tokens"]
    assert all(torch.equal(ckpt["params"][k], ref_ckpt["params"][k]) for k in names)
    for i, slots in ref_ckpt["optimizer"]["state"].items():  # AdamW moments and step counts
        assert all(torch.equal(ckpt["optimizer"]["state"][i][k], v) for k, v in slots.items())
    log = _logged(out)  # one record per step, each the uninterrupted run's
    assert [r["step"] for r in log] == list(range(1, STEPS + 1)), landed
    keys = ("loss", "ce_noisy", "grad_norm", "lr", "draft_acc", "seq_tokens")
    for want, got in zip(ref.history, log):
        assert [got[k] for k in keys] == [want[k] for k in keys], (got["step"], landed)



class _Killed(BaseException):
    """Stands for SIGKILL at an injected point: nothing after it runs."""


def _dying(real, name: str, calls: list[str], kill_at: int):
    """``real``, logging its calls, killed (``_Killed``) at call number ``kill_at`` of all logged ones."""
    def op(*args, **kwargs):
        calls.append(name)
        if len(calls) > kill_at:
            raise _Killed
        return real(*args, **kwargs)
    return op


def test_fsdp_checkpoint_is_whole_after_a_kill_at_any_point(tmp_path, monkeypatch):
    """``save_sharded`` (FSDP checkpoints) stopped before each of its file-system operations in turn (its
    own and those inside ``torch.distributed.checkpoint.save``): ``load_sharded`` then reads back the
    previous checkpoint or the new one, whole (state and shards of the same step), never an error or a
    mix. One process (gloo, world 1) runs the real code on a tiny FSDP2 module."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from idlm.train import sharding

    def model_and_opt(value: float):
        net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        with torch.no_grad():
            for p in net.parameters():
                p.fill_(value)
        net = fully_shard(net, mesh=init_device_mesh("cpu", (1,)))
        opt = torch.optim.AdamW(net.parameters(), lr=0.01)
        net(torch.ones(1, 4)).sum().backward()
        opt.step()  # some optimizer state to save
        return net, opt

    def read_back(ckpt: Path) -> tuple[int, int]:
        """(step of the state, which weights the shards hold: 1 or 2)."""
        net, opt = model_and_opt(0.0)
        step = sharding.load_sharded(ckpt, net, opt, lora=False)["state"]["step"]
        mean = torch.cat([p.full_tensor().flatten() for p in net.parameters()]).mean().item()
        return step, round(mean)

    ops = [(sharding.os, "replace"), (sharding.shutil, "rmtree"), (dcp, "save"), (Path, "mkdir"),
           (Path, "write_text"), (Path, "open"), (Path, "rename"), (Path, "replace")]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        for kill_at in range(200):
            ckpt = tmp_path / str(kill_at) / "checkpoint"
            ckpt.mkdir(parents=True)
            for step in (1, 2):  # two checkpoints before the one that is killed: both slots in use
                sharding.save_sharded(ckpt, *model_and_opt(step), False, {"state": {"step": step}}, True)
            net, opt = model_and_opt(1.0)
            calls = []
            with monkeypatch.context() as m:
                for owner, name in ops:
                    m.setattr(owner, name, _dying(getattr(owner, name), name, calls, kill_at))
                try:
                    sharding.save_sharded(ckpt, net, opt, False, {"state": {"step": 3}}, True)
                except (_Killed, CheckpointException):  # DCP wraps what stops it
                    assert len(calls) > kill_at
            try:
                got = read_back(ckpt)
            except (OSError, ValueError, AssertionError, CheckpointException) as e:
                raise AssertionError(f"killed before {calls[-1]} (operation {kill_at}): {e!r}") from None
            assert got in ((2, 2), (3, 1)), f"killed before {calls[-1]} (operation {kill_at}): {got}"
            if len(calls) <= kill_at:  # the save ran to the end without reaching the kill
                assert got == (3, 1)
                break
        else:
            raise AssertionError("save_sharded never finished")
    finally:
        dist.destroy_process_group()
