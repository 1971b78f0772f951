"""Training-throughput benchmark: tokens/s of the ``[x_t | x_0]`` sequence for each mode × precision.

``python -m idlm.train.bench DATA.jsonl [--model M] [--steps 4] [--row-tokens 512]`` runs a few
optimizer steps of ``idlm convert`` per configuration (the first step is a warm-up and is not
counted), prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass

from .config import ConvertConfig
from .loop import Trainer


@dataclass(frozen=True)
class BenchRow:
    """Throughput of one configuration."""

    mode: str  # full | lora
    precision: str  # fp32 | bf16
    tok_s: float  # median [x_t|x_0] tokens/s (2·ΣL per second) over the counted steps
    resp_tok_s: float  # median response tokens/s
    step_s: float  # median seconds per optimizer step


def bench_train(data: str, model: str | None = None, modes: tuple[str, ...] = ("full", "lora"),
                precisions: tuple[str, ...] = ("fp32", "bf16"), steps: int = 4, row_tokens: int = 512,
                batch_rows: int = 1, stride: int = 4, lora_rank: int = 32) -> list[BenchRow]:
    rows = []
    for mode in modes:
        for precision in precisions:
            with tempfile.TemporaryDirectory() as out:
                cfg = ConvertConfig(data=(data,), out=out, model=model, mode=mode,
                                    stages=f"{stride}:{steps + 1}", precision=precision,
                                    row_tokens=row_tokens, max_len=row_tokens, batch_rows=batch_rows,
                                    save_every=0, progress=False, lora_rank=lora_rank,
                                    lora_alpha=2.0 * lora_rank)
                trainer = Trainer(cfg)
                hist = [trainer.train_step() for _ in range(steps + 1)][1:]
            rows.append(BenchRow(mode, precision, statistics.median(h["tok_s"] for h in hist),
                                 statistics.median(h["resp_tok_s"] for h in hist),
                                 statistics.median(h["step_s"] for h in hist)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("--model", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--row-tokens", type=int, default=512)
    p.add_argument("--batch-rows", type=int, default=1)
    p.add_argument("--stride", type=int, default=4)
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--precisions", default="fp32,bf16")
    a = p.parse_args(argv)
    rows = bench_train(a.data, a.model, tuple(a.modes.split(",")), tuple(a.precisions.split(",")), a.steps,
                       a.row_tokens, a.batch_rows, a.stride)
    print(f"{'mode':6} {'precision':9} {'tok/s':>8} {'resp tok/s':>10} {'s/step':>7}")
    for r in rows:
        print(f"{r.mode:6} {r.precision:9} {r.tok_s:8.1f} {r.resp_tok_s:10.1f} {r.step_s:7.2f}")
    print(json.dumps({"bench": "train", "rows": [vars(r) for r in rows]}))


if __name__ == "__main__":
    main()
