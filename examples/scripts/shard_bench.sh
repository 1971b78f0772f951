#!/bin/bash
# Run from the repository root; needs runs/data/train.jsonl (README, "The shipped default drafter"), or any data file.
# FSDP vs DDP on this CPU: 2 processes (gloo, 1 thread each), SmolLM2-135M, 8 steps of 512-token rows.
. .venv/bin/activate
for mode in ${MODES:-full lora}; do
  for sh in ddp fsdp; do
    rm -rf runs/shard-$mode-$sh
    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 -m idlm.cli convert \
      --data ${DATA:-runs/data/train.jsonl} --out runs/shard-$mode-$sh --mode $mode --sharding $sh --stages 3:8 \
      --save-every 4 --no-progress > runs/shard-$mode-$sh.log 2>&1
    echo "$mode $sh rc=$?"
  done
done
python - <<'PY'
import json, statistics
import os
for mode in os.environ.get("MODES", "full lora").split():
    for sh in ("ddp", "fsdp"):
        recs = [json.loads(l) for l in open(f"runs/shard-{mode}-{sh}/train_log.jsonl")]
        tail = recs[2:]  # skip warm-up steps
        print(mode, sh, "peak_mem_mb(rank0)", recs[-1]["peak_mem_mb"], "seq tok/s", round(statistics.median(r["tok_s"] for r in tail)),
              "loss", [round(r["loss"], 3) for r in recs])
PY
