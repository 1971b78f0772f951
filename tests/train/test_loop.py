"""End-to-end training on a tiny model: overfitting, kill-and-resume, export and reload."""

from __future__ import annotations

import json

import pytest
import torch

from idlm.data.records import load_samples
from idlm.model import load_model
from idlm.train import ConvertConfig, load_converted, run_convert
from idlm.train import loop as loop_mod
from idlm.train.batch import collate
from idlm.train.forward import forward_clean_prefix, forward_joint


def _cfg(tiny_folder, toy_data, out, **kw) -> ConvertConfig:
    base = {"data": (str(toy_data),), "out": str(out), "model": str(tiny_folder), "stages": "3:40",
            "lr": 3e-3, "row_tokens": 64, "max_len": 64, "batch_rows": 2, "save_every": 0, "progress": False,
            "lora_rank": 8, "lora_alpha": 16.0, "precision": "fp32"}
    return ConvertConfig(**{**base, **kw})


@pytest.mark.parametrize("mode,lr", [("full", 3e-3), ("lora", 1e-2)])
def test_tiny_model_overfits_toy_data(tiny_folder, toy_data, tmp_path, mode, lr):
    res = run_convert(_cfg(tiny_folder, toy_data, tmp_path / mode, mode=mode, lr=lr))
    h = res.history
    assert len(h) == 40 and res.steps == 40
    assert h[-1]["loss"] < 0.2 * h[0]["loss"]
    assert h[-1]["draft_acc"][0] > h[0]["draft_acc"][0] + 0.5
    assert h[-1]["draft_acc"][1] > h[0]["draft_acc"][1] + 0.5
    assert (h[0]["ce_clean"] is None) == (mode == "lora")
    logged = [json.loads(x) for x in (tmp_path / mode / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 41)) and logged[-1]["tok_s"] > 0


def test_bf16_lora_trains_with_a_bf16_base(tiny_folder, toy_data, tmp_path):
    trainer = loop_mod.Trainer(_cfg(tiny_folder, toy_data, tmp_path, mode="lora", lr=1e-2, precision="bf16"))
    h = trainer.run().history
    assert trainer.model.layers[0].qkv.weight.dtype == torch.bfloat16
    assert trainer.model.layers[0].qkv.lora_A.dtype == torch.float32
    assert h[-1]["loss"] < 0.3 * h[0]["loss"]


def test_kill_and_resume_reproduces_the_curve(tiny_folder, toy_data, tmp_path, monkeypatch):
    kw = {"stages": "2:5,3:5", "grad_accum": 2, "save_every": 3, "mode": "full"}
    full = run_convert(_cfg(tiny_folder, toy_data, tmp_path / "a", **kw)).history

    real_step = loop_mod.Trainer.train_step

    def dying_step(self):
        if self.state.step == 7:
            raise KeyboardInterrupt  # killed during step 8: last checkpoint is step 6
        return real_step(self)

    monkeypatch.setattr(loop_mod.Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_convert(_cfg(tiny_folder, toy_data, tmp_path / "b", **kw))
    monkeypatch.setattr(loop_mod.Trainer, "train_step", real_step)
    resumed = run_convert(_cfg(tiny_folder, toy_data, tmp_path / "b", resume=True, **kw))
    assert [r["step"] for r in resumed.history] == [7, 8, 9, 10]
    logged = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 11))
    a = torch.tensor([r["loss"] for r in full])
    b = torch.tensor([r["loss"] for r in logged])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert logged[-1]["seq_tokens"] == full[-1]["seq_tokens"]


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_export_reloads_the_trained_model(tiny_folder, toy_data, tmp_path, mode):
    out = tmp_path / mode
    trainer = loop_mod.Trainer(_cfg(tiny_folder, toy_data, out, mode=mode, stages="2:3"))
    trainer.run()
    conv = load_converted(out)
    assert conv.meta.mode == mode and conv.meta.stride == 2 and conv.meta.block_size == 1
    assert conv.meta.mask_token_id == 128 and conv.meta.steps == 3
    batch = collate([load_samples([str(toy_data)])[:2]], 1, 128)
    fwd = forward_clean_prefix if mode == "lora" else forward_joint
    with torch.no_grad():
        want, got = fwd(trainer.model, batch), fwd(conv.loaded.model, batch)
    torch.testing.assert_close(got.noisy, want.noisy, atol=1e-5, rtol=0)
    if mode == "full":  # also a plain model folder for load_model
        direct = load_model(str(out)).model
        torch.testing.assert_close(direct.embed.weight, trainer.model.embed.weight)
    else:  # clean path is the untouched base
        base = load_model(str(tiny_folder)).model
        ids = torch.arange(10)
        torch.testing.assert_close(base(ids, ids), conv.loaded.model(ids, ids), atol=0, rtol=0)


@pytest.mark.slow
def test_two_process_ddp_equals_gradient_accumulation(tiny_folder, toy_data, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with accum 1 sees the same rows and normalisers as one
    process with accum 2, so the loss curves agree."""
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from idlm.train import ConvertConfig, run_convert
        accum, out = int(sys.argv[1]), sys.argv[2]
        cfg = ConvertConfig(data=({str(toy_data)!r},), out=out, model={str(tiny_folder)!r}, mode="lora",
                            stages="3:4", lr=1e-2, row_tokens=64, max_len=64, grad_accum=accum, save_every=0,
                            progress=False, precision="fp32", lora_rank=8, lora_alpha=16.0)
        run_convert(cfg)
    """))
    subprocess.run([sys.executable, str(script), "2", str(tmp_path / "one")], check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script), "1",
                    str(tmp_path / "two")], check=True)

    def losses(name):
        return [json.loads(x)["loss"] for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    torch.testing.assert_close(torch.tensor(losses("one")), torch.tensor(losses("two")), atol=1e-5, rtol=1e-5)


def test_init_from_warm_starts_a_lora_run(tiny_folder, toy_data, tmp_path):
    """--init-from loads a finished adapter (and its MASK row) before training: a run that continues
    from it starts at the loss where the first run ended, not at the untrained loss."""
    first = run_convert(_cfg(tiny_folder, toy_data, tmp_path / "a", mode="lora", lr=1e-2))
    trainer = loop_mod.Trainer(_cfg(tiny_folder, toy_data, tmp_path / "b", mode="lora", lr=1e-2,
                                    init_from=str(tmp_path / "a")))
    from safetensors.torch import load_file

    from idlm.model.lora import lora_state_dict

    saved = load_file(str(tmp_path / "a" / "adapter.safetensors"))
    now = lora_state_dict(trainer.model)
    assert saved.keys() == now.keys()
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    h = trainer.run().history
    assert h[0]["loss"] < 0.5 * first.history[0]["loss"]
    with pytest.raises(ValueError, match="different rank"):
        loop_mod.Trainer(_cfg(tiny_folder, toy_data, tmp_path / "c", mode="lora", lora_rank=4,
                              init_from=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="needs --mode lora"):
        _cfg(tiny_folder, toy_data, tmp_path / "d", mode="full", init_from=str(tmp_path / "a"))


def test_convert_without_model_trains_the_bare_base(tiny_folder, toy_data, tmp_path, monkeypatch):
    """load_model(None) is the shipped drafter; conversion must start from the base model instead."""
    from idlm.model.loading import DEFAULT_MODEL

    asked = []
    real_load = loop_mod.load_model

    def fake_load(name, **kw):
        asked.append(name)
        return real_load(str(tiny_folder), **kw)

    monkeypatch.setattr(loop_mod, "load_model", fake_load)
    loop_mod.Trainer(_cfg(tiny_folder, toy_data, tmp_path, model=None, mode="lora"))
    assert asked == [DEFAULT_MODEL]
