"""The ``idlm convert`` training loop: stride curriculum, AdamW + warmup/cosine, gradient clipping and
accumulation, optional bf16 autocast, atomic checkpoints with resume, progress bar, JSONL log.

Runs unchanged as one process or under ``torchrun`` / ``accelerate launch``: when ``WORLD_SIZE > 1``
it joins the process group, wraps the objective in DDP or FSDP2 (``sharding.py``) and gives each rank
its own micro-batches.
The data order is a pure function of (seed, step), so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import ConfigError
from ..data.records import LazyTokenizer, load_samples
from ..model.converted import ADAPTER_FILE
from ..model.decoder import Decoder
from ..model.loading import DEFAULT_MODEL, load_model
from ..model.lora import add_lora, copy_lora_state
from .batch import Sample, TrainBatch, collate, epoch_rows, truncate
from .checkpoint import ConvertedMeta, save_converted
from .config import ConvertConfig, Stage
from .distill import acceptance_rates, reach_weights, update_acceptance
from .forward import forward_clean_prefix, forward_joint
from .loss import PLAIN_CE, LossOutput, LossWeights, NoisyTarget, idlm_loss
from .sharding import (
    SHARDED_STATE,
    choose_sharding,
    clip_grad_norm,
    full_state,
    grad_sync,
    load_sharded,
    save_sharded,
    trainable_params,
    wrap,
)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
LOG_FILE = "train_log.jsonl"


@dataclass(frozen=True)
class DistInfo:
    """Process-group facts; world 1 when not distributed."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun / accelerate); NCCL for
    a CUDA ``device``, gloo otherwise. An already initialised group is used as it is."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, local_rank: int) -> str:
    if name != "auto":
        return name
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def use_bf16(precision: str, device: str) -> bool:
    """bf16 autocast: on request, or 'auto' where the hardware has native bf16 matmuls (GPUs that
    support it; CPUs with AVX512-BF16/AMX, where it measured 1.4-1.8x faster than fp32)."""
    if precision != "auto":
        return precision == "bf16"
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Objective(nn.Module):
    """Model + the I-DLM forward and loss of one micro-batch (the unit DDP wraps)."""

    def __init__(self, model: Decoder, mode: str, loss_chunk: int):
        super().__init__()
        self.model, self.mode, self.loss_chunk = model, mode, loss_chunk

    def forward(self, batch: TrainBatch, weights: LossWeights, noisy_norm: float, clean_norm: float,
                target: NoisyTarget = PLAIN_CE) -> tuple[torch.Tensor, LossOutput]:
        fwd = forward_clean_prefix if self.mode == "lora" else forward_joint
        out = idlm_loss(self.model, fwd(self.model, batch), batch, weights, noisy_norm, clean_norm,
                        self.loss_chunk, target)
        return out.loss, out


def lr_factor(step_in_stage: int, steps: int, warmup_ratio: float, min_ratio: float) -> float:
    """Linear warmup then cosine decay to ``min_ratio``, restarted at each curriculum stage."""
    warm = math.ceil(warmup_ratio * steps)
    if step_in_stage < warm:
        return (step_in_stage + 1) / warm
    progress = (step_in_stage - warm) / max(1, steps - warm)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_at(stages: tuple[Stage, ...], step: int) -> tuple[Stage, int]:
    """The stage that optimizer step ``step`` (0-based) belongs to, and the step inside it."""
    for s in stages:
        if step < s.steps:
            return s, step
        step -= s.steps
    raise IndexError("step past the last stage")


class RowStream:
    """Packed rows in a deterministic order: micro-batch j (counted over all ranks) takes rows
    ``j*R .. j*R+R-1`` of the endless concatenation of seeded epochs (epochs may pack into
    different numbers of rows)."""

    def __init__(self, samples: list[Sample], budget: int, seed: int):
        if not samples:
            raise ValueError("no training samples left after truncation")
        self.samples, self.budget, self.seed = samples, budget, seed
        self._epochs: list[list[list[int]]] = []

    def _row(self, r: int) -> list[int]:
        start = 0
        for e in range(r + 1):  # every epoch has at least one row
            if e == len(self._epochs):
                self._epochs.append(epoch_rows(self.samples, self.budget, self.seed, e))
            rows = self._epochs[e]
            if r < start + len(rows):
                return rows[r - start]
            start += len(rows)
        raise AssertionError("unreachable")

    def rows(self, micro_index: int, count: int) -> list[list[Sample]]:
        return [[self.samples[i] for i in self._row(r)]
                for r in range(micro_index * count, (micro_index + 1) * count)]


@dataclass
class TrainState:
    """Everything a checkpoint restores besides parameters and optimizer state."""

    step: int = 0  # optimizer steps done
    seq_tokens: int = 0  # [x_t|x_0] tokens (2·ΣL) seen, all ranks
    response_tokens: int = 0  # response tokens seen, all ranks
    elapsed: float = 0.0  # training wall time so far (s)
    # --accept-weighting: the acceptance estimator's discounted per-offset counts (distill.py)
    accept_accepted: list[float] = field(default_factory=list)  # reached MASK rows that agreed
    accept_reached: list[float] = field(default_factory=list)  # MASK rows whose earlier drafts all agreed


@dataclass(frozen=True)
class ConvertResult:
    """What ``run_convert`` produced."""

    out_dir: Path  # the export directory
    steps: int  # optimizer steps done in total
    last_loss: float  # loss of the last step
    log_path: Path  # train_log.jsonl
    history: list[dict] = field(default_factory=list)  # the log records written by this call
    is_main: bool = True  # rank 0 (the process that reports) when distributed


class Trainer:
    """One ``idlm convert`` run (see ``run_convert``)."""

    def __init__(self, cfg: ConvertConfig):
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.dist = setup_distributed(resolve_device(cfg.device, 0))
        self.sharding = choose_sharding(cfg.sharding, self.dist.world)
        self.device = resolve_device(cfg.device, self.dist.local_rank)
        if self.device.startswith("cuda"):
            torch.cuda.set_device(self.device)
        self.out = Path(cfg.out)
        self.stages = cfg.stage_list
        # the bare base by default (never the shipped drafter, which load_model(None) would give);
        # FSDP loads on the CPU and moves only each rank's shard to the device
        lm = load_model(cfg.model or DEFAULT_MODEL, device="cpu" if self.sharding.fsdp else self.device, check_rows=False)
        self.base_folder, self.model = lm.folder, lm.model
        samples = [truncate(s, cfg.max_len) for s in load_samples(cfg.data, LazyTokenizer(lm))]
        self.stream = RowStream([s for s in samples if s is not None], cfg.row_tokens, cfg.seed)
        self.bf16 = use_bf16(cfg.precision, self.device)
        params = self._trainable()
        self.objective: nn.Module = wrap(Objective(self.model, cfg.mode, cfg.loss_chunk), self.sharding,
                                         self.device, self.bf16)
        # FSDP replaces the parameters with sharded ones; otherwise keep _trainable's order (the
        # optimizer state in one-file checkpoints is stored by position)
        self.params = trainable_params(self.objective) if self.sharding.fsdp else params
        self.opt = _adamw(self.params, cfg.peak_lr, cfg.weight_decay, fused=not self.sharding.fsdp)
        self.state = TrainState()

    def _trainable(self) -> list[nn.Parameter]:
        cfg = self.cfg
        if cfg.mode == "lora":
            torch.manual_seed(cfg.seed)  # LoRA A init: identical across ranks and reruns
            params = add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.target_list, cfg.train_mask_row)
            if cfg.init_from is not None:
                copy_lora_state(self.model, _adapter_state(cfg.init_from))
            if self.bf16:  # the frozen base: cast once, not at every matmul (FSDP needs one dtype only
                # among the trainable parameters, which stay fp32)
                for p in self.model.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
            return params
        self.model.requires_grad_(True)
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- checkpoints -------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.out / CHECKPOINT_DIR / STATE_FILE

    @property
    def sharded_state_path(self) -> Path:
        return self.out / CHECKPOINT_DIR / SHARDED_STATE

    def save_checkpoint(self) -> None:
        """Parameters + optimizer + TrainState (one file; FSDP: one shard file per rank), then the export."""
        ckpt = self.out / CHECKPOINT_DIR
        if self.sharding.fsdp:
            save_sharded(ckpt, self.objective, self.opt, self.cfg.mode == "lora",
                         {"state": asdict(self.state), "config": asdict(self.cfg)}, self.dist.is_main)
        elif self.dist.is_main:
            ckpt.mkdir(parents=True, exist_ok=True)
            named = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
            blob = {"state": asdict(self.state), "params": named, "optimizer": self.opt.state_dict(),
                    "config": asdict(self.cfg)}
            tmp = self.state_path.with_name(STATE_FILE + ".tmp")
            with tmp.open("wb") as f:  # a kill at any point leaves the previous checkpoint whole
                torch.save(blob, f)
                _test_pause("state", self.state.step)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.state_path)
            _fsync_dir(ckpt)
        _test_pause("export", self.state.step)
        self.export()
        self._barrier()

    def has_checkpoint(self) -> bool:
        return self.state_path.exists() or self.sharded_state_path.exists()

    def load_checkpoint(self) -> None:
        if self.sharding.fsdp != self.sharded_state_path.exists():
            kind = "an FSDP" if self.sharded_state_path.exists() else "a one-file (single-process / DDP)"
            raise ConfigError(f"--resume: {self.out / CHECKPOINT_DIR} holds {kind} checkpoint; resume it with "
                              "the same --sharding it was written with")
        if self.sharding.fsdp:
            blob = load_sharded(self.out / CHECKPOINT_DIR, self.objective, self.opt, self.cfg.mode == "lora")
            self._check_resumable(blob["config"])
        else:
            blob = torch.load(self.state_path, map_location=self.device, weights_only=False)
            self._check_resumable(blob["config"])
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, t in blob["params"].items():
                    params[name].copy_(t)
            self.opt.load_state_dict(blob["optimizer"])
        self.state = TrainState(**blob["state"])

    def _check_resumable(self, saved: dict) -> None:
        for key in ("mode", "lora_rank", "lora_targets", "model"):
            if saved.get(key) != getattr(self.cfg, key):
                raise ConfigError(f"--resume: the checkpoint has {key}={saved.get(key)!r}, "
                                  f"this run {getattr(self.cfg, key)!r}")

    def export(self) -> Path | None:
        """Write the converted model (rank 0). Under FSDP every rank takes part in gathering the shards."""
        state = full_state(self.objective, self.cfg.mode == "lora") if self.sharding.fsdp else None
        if not self.dist.is_main:
            return None
        cfg, stage = self.cfg, stage_at(self.stages, max(self.state.step - 1, 0))[0]
        meta = ConvertedMeta(
            base_model=_base_name(cfg.model), mode=cfg.mode, mask_token_id=self.model.cfg.mask_token_id,
            block_size=stage.block, stride=stage.stride, steps=self.state.step,
            lora_rank=cfg.lora_rank if cfg.mode == "lora" else 0,
            lora_alpha=cfg.lora_alpha if cfg.mode == "lora" else 0.0,
            lora_targets=cfg.target_list if cfg.mode == "lora" else (), attention=cfg.attention)
        return save_converted(self.model, self.out, meta, self.base_folder, state=state)

    def _barrier(self) -> None:
        if self.dist.world > 1:
            torch.distributed.barrier()

    # ---- one optimizer step ------------------------------------------------------------------
    def _micro_batches(self, stage: Stage) -> list[TrainBatch]:
        cfg, d = self.cfg, self.dist
        first = self.state.step * cfg.grad_accum
        return [collate(self.stream.rows((first + a) * d.world + d.rank, cfg.batch_rows), stage.block,
                        self.model.cfg.mask_token_id, trim_prompt=cfg.trim_prompt,
                        attention=cfg.attention).to(self.device)
                for a in range(cfg.grad_accum)]

    def _all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.dist.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def train_step(self) -> dict:
        cfg = self.cfg
        stage, inner = stage_at(self.stages, self.state.step)
        lr = cfg.peak_lr * lr_factor(inner, stage.steps, cfg.warmup_ratio, cfg.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr
        auto = bool(cfg.auto_balance_from) and stage.stride >= cfg.auto_balance_from
        weights = LossWeights(cfg.ce_alpha, auto, use_clean=cfg.mode == "full")
        target = self._noisy_target(stage)
        t0 = time.perf_counter()
        batches = self._micro_batches(stage)
        counts = [sum(b.n_response for b in batches),
                  sum(int((b.clean_targets != -100).sum()) for b in batches)]
        n_resp, n_clean = self._all_sum(counts)
        # DDP averages gradients over ranks, so normalise by the per-rank share of the global count.
        noisy_norm, clean_norm = max(n_resp, 1) / self.dist.world, max(n_clean, 1) / self.dist.world
        stats = self._accumulate(batches, weights, noisy_norm, clean_norm, target)
        grad_norm = self._clip()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        return self._record(stage, lr, stats, grad_norm, dt, batches, target)

    def _noisy_target(self, stage: Stage) -> NoisyTarget:
        """The MASK rows' objective for this step; with --accept-weighting, the reach weights from
        the acceptance estimate of the steps before it."""
        cfg = self.cfg
        reach = (reach_weights(self.state.accept_accepted, self.state.accept_reached, stage.block)
                 if cfg.accept_weighting else None)
        return NoisyTarget(cfg.objective, cfg.distill_temperature, cfg.distill_top_k, reach)

    def _accumulate(self, batches: list[TrainBatch], weights: LossWeights, noisy_norm: float,
                    clean_norm: float, target: NoisyTarget = PLAIN_CE) -> dict[str, torch.Tensor]:
        amp = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16) if self.bf16 else nullcontext()
        total = {"loss": 0.0, "ce_noisy": 0.0, "ce_clean": 0.0, "hits": 0, "count": 0, "soft_noisy": 0.0,
                 "agree": 0, "chain_accepted": 0, "chain_reached": 0}
        for i, batch in enumerate(batches):
            with grad_sync(self.objective, self.sharding, sync=i == len(batches) - 1):
                with amp:
                    loss, out = self.objective(batch, weights, noisy_norm, clean_norm, target)
                loss.backward()
            total["loss"] += loss.detach()
            total["ce_noisy"] += out.ce_noisy
            total["ce_clean"] += out.ce_clean if out.ce_clean is not None else 0.0
            total["hits"] += out.draft_correct
            total["count"] += out.draft_count
            if out.soft_noisy is not None:
                total["soft_noisy"] += out.soft_noisy
            if out.agree_correct is not None:
                total["agree"] += out.agree_correct
                total["chain_accepted"] += out.chain_accepted
                total["chain_reached"] += out.chain_reached
        return total

    def _clip(self) -> float:
        return clip_grad_norm(self.params, self.cfg.grad_clip)

    def _record(self, stage: Stage, lr: float, s: dict, grad_norm: float, dt: float,
                batches: list[TrainBatch], target: NoisyTarget = PLAIN_CE) -> dict:
        w = self.dist.world
        scal = self._all_sum([float(s["loss"]), float(s["ce_noisy"]), float(s["ce_clean"]),
                              sum(b.n_seq_tokens for b in batches), sum(b.n_response for b in batches)])
        hits, count = self._all_sum(s["hits"].tolist()), self._all_sum(s["count"].tolist())
        extra = self._distill_record(s, target, count, stage.block)
        self.state.step += 1
        self.state.seq_tokens += int(scal[3])
        self.state.response_tokens += int(scal[4])
        self.state.elapsed += dt
        return {"step": self.state.step, "stride": stage.stride, "block": stage.block, "lr": lr,
                "loss": scal[0] / w, "ce_noisy": scal[1] / w,
                "ce_clean": scal[2] / w if self.cfg.mode == "full" else None,
                "draft_acc": [h / c if c else None for h, c in zip(hits, count)],
                "draft_count": [int(c) for c in count], "grad_norm": grad_norm,
                "tok_s": scal[3] / dt, "resp_tok_s": scal[4] / dt, "step_s": dt,
                "seq_tokens": self.state.seq_tokens, "response_tokens": self.state.response_tokens,
                "elapsed": round(self.state.elapsed, 3), "peak_mem_mb": round(_peak_memory_mb(self.device)),
                **extra}

    def _distill_record(self, s: dict, target: NoisyTarget, count: list[float], block: int) -> dict:
        """The log fields of --objective / --accept-weighting (all ranks summed), and the update of
        the acceptance estimate with this step's counts. ``soft_noisy`` is the MASK rows' divergence
        from p (named by ``objective``; kl for mix), ``agree`` the per-offset rate of argmax q ==
        argmax p, ``reach`` the weights this step used and ``accept_est`` the acceptance rates the
        next step's weights come from."""
        rec: dict = {"objective": target.objective}
        if target.soft:
            rec["soft_noisy"] = self._all_sum([float(s["soft_noisy"])])[0] / self.dist.world
        if not target.needs_teacher:
            return rec
        agree = self._all_sum(s["agree"].tolist())
        rec["agree"] = [a / c if c else None for a, c in zip(agree, count)]
        if target.reach is not None:
            acc, rch = self._all_sum(s["chain_accepted"].tolist()), self._all_sum(s["chain_reached"].tolist())
            st = self.state
            st.accept_accepted, st.accept_reached = update_acceptance(st.accept_accepted, st.accept_reached,
                                                                      acc, rch)
            rec["reach"] = list(target.reach)
            rec["accept_est"] = acceptance_rates(st.accept_accepted, st.accept_reached, block)
        return rec

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> ConvertResult:
        cfg = self.cfg
        if cfg.resume and self.has_checkpoint():
            self.load_checkpoint()
        end = min(cfg.total_steps, cfg.stop_at) if cfg.stop_at else cfg.total_steps
        history: list[dict] = []
        bar = _progress(cfg.progress and self.dist.is_main, self.state.step, cfg.total_steps)
        log = (self.out / LOG_FILE) if self.dist.is_main else None
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            _truncate_log(log, self.state.step)  # a killed run's records past its checkpoint
        last = float("nan")
        while self.state.step < end:
            rec = self.train_step()
            history.append(rec)
            last = rec["loss"]
            if log and (rec["step"] % cfg.log_every == 0 or rec["step"] == end):
                with log.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.update(1)
            soft = {_soft_name(rec["objective"]): f"{rec['soft_noisy']:.3f}"} if "soft_noisy" in rec else {}
            bar.set_postfix(N=rec["stride"], loss=f"{last:.3f}", **soft, acc1=_fmt(rec["draft_acc"][0]),
                            tok_s=f"{rec['tok_s']:.0f}")
            if cfg.save_every and rec["step"] % cfg.save_every == 0 and rec["step"] < end:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        return ConvertResult(self.out, self.state.step, last, self.out / LOG_FILE, history, self.dist.is_main)


def _adamw(params: list[nn.Parameter], lr: float, weight_decay: float, fused: bool = True
           ) -> torch.optim.Optimizer:
    """AdamW (HF defaults, spec §2.4); the fused kernel where available (6x faster step on CPU)."""
    kw = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    if fused:
        try:
            return torch.optim.AdamW(params, fused=True, **kw)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, **kw)


def _peak_memory_mb(device: str) -> float:
    """This process's peak memory: allocated on the GPU, or resident (RSS) on the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _adapter_state(folder: str) -> dict[str, torch.Tensor]:
    """The adapter tensors of a ``--mode lora`` output folder (for ``--init-from``)."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise ConfigError(f"--init-from: {folder} has no {ADAPTER_FILE} (expected an `idlm convert --mode lora` "
                          "output folder)")
    return load_file(str(path))


def _base_name(model: str | None) -> str:
    """How the export names its base: the default's name, an absolute folder/file path, or a hub id."""
    if model is None:
        return DEFAULT_MODEL
    p = Path(model).expanduser()
    return str(p.resolve()) if p.exists() else model


def _soft_name(objective: str) -> str:
    """Progress-bar name of the soft loss: the divergence it is (mix logs its kl part)."""
    return "kl" if objective == "mix" else objective


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _progress(enabled: bool, initial: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="convert", unit="step", disable=not enabled,
                dynamic_ncols=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where a directory cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _test_pause(phase: str, step: int) -> None:
    """Test hook, inert unless ``IDLM_TEST_PAUSE`` is set to ``PHASE:STEP:FILE``: the checkpoint of step
    STEP creates FILE at PHASE and sleeps there, for tests/train/test_kill_resume.py to SIGKILL it.
    Phases: ``state`` (the new state is in its temporary file, not yet synced or renamed into place)
    and ``export`` (the new state is in place, the export not yet written)."""
    spec = os.environ.get("IDLM_TEST_PAUSE")
    if not spec:
        return
    want, at, path = spec.split(":", 2)
    if want == phase and int(at) == step:
        Path(path).touch()
        time.sleep(600)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records past ``step`` (where this run starts: a resumed run's checkpoint, or 0) so the
    log is one clean curve: no records of a killed run's steps after its last checkpoint, and no
    partly written last line."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def run_convert(cfg: ConvertConfig) -> ConvertResult:
    """CLI entry point of ``idlm convert``."""
    return Trainer(cfg).run()
