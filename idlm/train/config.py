"""Typed, frozen config of ``idlm convert``.

Each field's trailing comment is its ``--help`` text (``idlm.cli.flags`` reads it). The
stride curriculum is given as stages ``"N:STEPS,..."``: stage N trains block size B = N − 1 MASKs per
block (spec §1.6), so it serves ISD at stride N.
"""

from __future__ import annotations

from dataclasses import dataclass

from .distill import OBJECTIVES
from .mask import ATTENTIONS

MODES = ("full", "lora")
PRECISIONS = ("auto", "fp32", "bf16")
SHARDINGS = ("auto", "ddp", "fsdp", "fsdp-grad-op")
DEFAULT_LR = {"full": 1e-5, "lora": 2e-4}  # spec §2.4 (full), [FORK-R] LoRA recipe (lora)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage."""

    stride: int  # ISD stride N served by this stage
    steps: int  # optimizer steps in this stage

    @property
    def block(self) -> int:
        """Training block size B = N − 1 (MASKs per block)."""
        return self.stride - 1


def parse_stages(text: str) -> tuple[Stage, ...]:
    """``"2:100,3:200"`` → (Stage(2, 100), Stage(3, 200))."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            n, steps = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"--stages: {part!r} is not N:STEPS (e.g. 2:100,3:200)") from None
        if n < 2 or steps < 1:
            raise ValueError(f"--stages: {part!r} needs stride N >= 2 and STEPS >= 1")
        out.append(Stage(n, steps))
    if not out:
        raise ValueError("--stages: give at least one N:STEPS stage")
    return tuple(out)


@dataclass(frozen=True)
class ConvertConfig:
    """Convert a causal LM into an I-DLM (full) or train an R-ISD gated LoRA adapter (lora)."""

    data: tuple[str, ...]  # training JSONL: `idlm data generate` output, {prompt,response} or {messages}
    out: str  # output directory: converted model or adapter, idlm_convert.json, train_log.jsonl, checkpoint/
    model: str | None = None  # base model (folder, .gguf, hub id); default: embedded SmolLM2-135M-Instruct
    mode: str = "lora"  # full = all weights (I-DLM); lora = gated LoRA on MASKs only (R-ISD, lossless)
    attention: str = "causal"  # noisy-half mask: causal = I-DLM's strict causal (spec 1.4); bidirectional-block
    #   = the SDAR-style baseline (MASKs see their whole block), for `idlm iar` comparisons; ISD needs causal
    stages: str = "3:200"  # stride curriculum N:STEPS,...; stage N trains B = N-1 MASKs per block
    lr: float = 0.0  # peak learning rate; 0 = 1e-5 for full, 2e-4 for lora
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_ratio: float = 0.03  # linear warmup, as a fraction of each stage's steps
    min_lr_ratio: float = 0.0  # cosine decays to lr * this at the end of each stage
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    grad_accum: int = 1  # micro-batches per optimizer step
    batch_rows: int = 1  # packed rows per micro-batch
    row_tokens: int = 512  # token budget of one packed row (sum of sample lengths; the row is twice as long)
    max_len: int = 512  # truncate each sample (prompt + response) to this many tokens
    ce_alpha: float = 0.2  # fixed weight of CE_clean (full mode)
    auto_balance_from: int = 4  # stages with N >= this auto-balance CE_clean (detached ratio); 0 = never
    objective: str = "ce"  # loss of the MASK rows' distribution q: ce = hard CE on the response tokens; kl =
    #   KL(p||q), rkl = KL(q||p), tvd = total variation, mix = 0.5*kl + 0.5*ce, against p = the clean row's
    #   (base model's) next-token distribution at the same position, from the same forward, without gradient
    distill_temperature: float = 1.0  # temperature of p and q in kl/rkl/tvd/mix (kl, rkl scaled by T^2)
    distill_top_k: int = 0  # kl/rkl/tvd/mix: compare p and q on p's top K tokens plus one bucket for the
    #   rest of the mass; 0 = the full vocabulary
    accept_weighting: bool = False  # weight the MASK at draft offset k by the estimated probability that
    #   greedy ISD reaches it: the product of the acceptance rates of offsets 1..k-1 (argmax q == argmax p
    #   given the earlier drafts agreed; a running, detached estimate over ~10 steps)
    lora_rank: int = 32  # LoRA rank r (lora mode)
    lora_alpha: float = 64.0  # LoRA alpha; the update is scaled by alpha / r
    lora_targets: str = "qkv,o,gate_up,down"  # projections that get adapters
    train_mask_row: bool = True  # also train the MASK embedding row (lora mode; it only feeds MASK positions)
    precision: str = "auto"  # fp32 | bf16 (autocast) | auto (bf16 where the hardware has native bf16)
    trim_prompt: bool = True  # drop noisy-half prompt tokens that no loss position can see
    save_every: int = 100  # checkpoint (and export) every this many steps; 0 = only at the end
    resume: bool = False  # continue from OUT/checkpoint/state.pt
    init_from: str | None = None  # lora mode: start from this adapter folder's weights (fresh optimizer)
    stop_at: int = 0  # stop (after checkpointing) once this global step is reached; 0 = run all stages
    seed: int = 0  # data order seed
    device: str = "auto"  # cpu | cuda | cuda:K | auto (cuda:LOCAL_RANK when available)
    threads: int = 0  # torch CPU threads; 0 = torch's default (all cores). A resumed run repeats the
    #   uninterrupted one bit for bit when both use the same thread count on the same machine
    sharding: str = "auto"  # several processes: ddp (every rank holds the whole model) | fsdp (FSDP2:
    #   weights, gradients and optimizer state sharded, ZeRO-3-like) | fsdp-grad-op (layers stay gathered
    #   from forward to backward, ZeRO-2-like) | auto (what an `accelerate launch` FSDP config asks for,
    #   else ddp)
    log_every: int = 1  # write a train_log.jsonl record every this many steps
    loss_chunk: int = 1024  # rows per chunk of the output-head projection in the loss
    progress: bool = True  # show a progress bar (rank 0)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.sharding not in SHARDINGS:
            raise ValueError(f"--sharding must be one of {', '.join(SHARDINGS)}, got {self.sharding!r}")
        if not self.data:
            raise ValueError("--data: give at least one JSONL file")
        parse_stages(self.stages)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"--attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        positive = ("grad_accum", "batch_rows", "row_tokens", "max_len", "lora_rank", "log_every",
                    "loss_chunk")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not self.distill_temperature > 0 or self.distill_temperature == float("inf"):
            raise ValueError("--distill-temperature must be > 0")
        if self.distill_top_k < 0:
            raise ValueError("--distill-top-k must be >= 0")
        if self.objective == "ce" and (self.distill_temperature != 1.0 or self.distill_top_k):
            raise ValueError("--distill-temperature and --distill-top-k need a soft --objective "
                             "(kl, rkl, tvd or mix)")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if self.init_from is not None and self.mode != "lora":
            raise ValueError("--init-from needs --mode lora (it warm-starts an R-ISD adapter)")
        if self.max_len > self.row_tokens:
            raise ValueError(f"--max-len ({self.max_len}) must not exceed --row-tokens ({self.row_tokens})")

    @property
    def stage_list(self) -> tuple[Stage, ...]:
        return parse_stages(self.stages)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stage_list)

    @property
    def peak_lr(self) -> float:
        return self.lr or DEFAULT_LR[self.mode]

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
