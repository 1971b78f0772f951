#!/bin/bash
# LoRA rank sweep: three runs from scratch that differ only in rank (alpha = 2r), then TPF and speed at N = 3.
# Needs runs/data/mix.jsonl (README, "The shipped default drafter": the run-5 mix). Run from the repository root.
set -e
. .venv/bin/activate
for r in 8 32 128; do
  a=$((2*r))
  if [ ! -f runs/sweep-r$r/adapter.safetensors ]; then
    /usr/bin/time -v idlm convert --data runs/data/mix.jsonl --out runs/sweep-r$r --mode lora --stages 3:300 \
      --lr 5e-4 --lora-rank $r --lora-alpha $a --save-every 100 --seed 0 --no-progress > runs/sweep-r$r.log 2>&1
  fi
done
for r in 8 32 128; do
  idlm bench --model runs/sweep-r$r --modes ar,isd --stride 3 --prompts 8 --max-new-tokens 128 > runs/sweep-r$r.gsm.txt 2>&1
  idlm bench --model runs/sweep-r$r --modes ar,isd --stride 3 --prompts 8 --max-new-tokens 128 --prompt-file docs/prompts/nonmath8.txt > runs/sweep-r$r.chat.txt 2>&1
done
echo done > runs/sweep.done
