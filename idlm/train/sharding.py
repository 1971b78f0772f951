"""How ``idlm convert`` spreads one model over several processes: DDP (every rank holds everything) or
FSDP2 (``torch.distributed.fsdp.fully_shard``: parameters, gradients and optimizer state sharded over
the ranks; each decoder layer is gathered only while it runs).

Owns the choice of strategy (``--sharding``, or what ``accelerate launch`` with an FSDP config asks
for through its environment), wrapping the training objective, gradient-sync control for
accumulation, the global gradient norm, sharded checkpoints (``torch.distributed.checkpoint``: one
file per rank, resumable) and gathering the full state on rank 0 for the export.

FSDP units: one per decoder layer, and the objective (embedding, final norm, output head) as the
root. The LoRA path calls ``Layer.forward_over`` instead of ``Layer.forward``, so that method is
registered with FSDP too (it gathers the layer's shards on entry).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError

SHARDED_DIR = "sharded"  # DCP files of an FSDP checkpoint, under OUT/checkpoint/
SHARDED_STATE = "state.json"  # TrainState + config of an FSDP checkpoint


@dataclass(frozen=True)
class Sharding:
    """The strategy of one run. ``kind``: none (one process), ddp or fsdp."""

    kind: str = "none"
    reshard_after_forward: bool = True  # fsdp: free gathered layers after forward (ZeRO-3); False = ZeRO-2
    cpu_offload: bool = False  # fsdp: keep parameter shards and optimizer state in CPU memory

    @property
    def fsdp(self) -> bool:
        return self.kind == "fsdp"


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def choose_sharding(requested: str, world: int) -> Sharding:
    """``--sharding`` → the strategy. ``auto`` follows ``accelerate launch``: FSDP when its config enabled
    FSDP (``ACCELERATE_USE_FSDP``; ``FSDP_RESHARD_AFTER_FORWARD`` / ``FSDP_SHARDING_STRATEGY`` pick ZeRO-3 or
    ZeRO-2 behaviour, ``FSDP_OFFLOAD_PARAMS`` CPU offload), otherwise DDP when there are several processes."""
    if world <= 1:
        if requested in ("fsdp", "fsdp-grad-op"):
            raise ConfigError(f"--sharding {requested} needs several processes: launch with torchrun or "
                              "`accelerate launch` (see examples/accelerate/)")
        return Sharding()
    if requested == "auto" and _env_true("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise ConfigError(f"the accelerate config asks for FSDP version {version}; idlm shards with FSDP2: "
                              "set `fsdp_version: 2` (see examples/accelerate/fsdp2_8gpu.yaml)")
        strategy = os.environ.get("FSDP_SHARDING_STRATEGY", "").upper()
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
        grad_op = reshard in ("false", "0", "no") or strategy in ("SHARD_GRAD_OP", "2")
        return Sharding("fsdp", reshard_after_forward=not grad_op, cpu_offload=_env_true("FSDP_OFFLOAD_PARAMS"))
    if requested in ("fsdp", "fsdp-grad-op"):
        return Sharding("fsdp", reshard_after_forward=requested == "fsdp")
    return Sharding("ddp")


def wrap(objective: nn.Module, sharding: Sharding, device: str, bf16: bool) -> nn.Module:
    """DDP- or FSDP-wrap the objective (``objective.model`` is the Decoder); unchanged for one process."""
    if sharding.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        local = int(os.environ.get("LOCAL_RANK", "0"))
        return DDP(objective, device_ids=[local] if device.startswith("cuda") else None)
    if not sharding.fsdp:
        return objective
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    # Layer.forward_over returns k/v views; nothing writes into them in place, which is what FSDP warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.split(":")[0], (torch.distributed.get_world_size(),))
    kw = {"mesh": mesh, "reshard_after_forward": sharding.reshard_after_forward}
    if bf16:  # gather bf16 shards (half the traffic), reduce gradients in fp32
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if sharding.cpu_offload and not device.startswith("cpu"):  # on a CPU run everything is in CPU memory already
        kw["offload_policy"] = CPUOffloadPolicy()
    for layer in objective.model.layers:
        fully_shard(layer, **kw)
        register_fsdp_forward_method(layer, "forward_over")  # the LoRA path's layer step (forward_clean_prefix)
    fully_shard(objective, **{**kw, "reshard_after_forward": False})  # root: embedding, norm, head
    return objective


def grad_sync(wrapped: nn.Module, sharding: Sharding, sync: bool):
    """Context for one micro-batch's backward: reduce gradients only on the last one (accumulation)."""
    from contextlib import nullcontext

    if sharding.kind == "ddp" and not sync:
        return wrapped.no_sync()
    if sharding.fsdp:
        wrapped.set_requires_gradient_sync(sync)
    return nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The global gradient norm (clipped to ``max_norm`` when > 0), a float on every rank; FSDP's
    sharded gradients give a DTensor norm, made whole here."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)


def trainable_params(module: nn.Module) -> list[nn.Parameter]:
    """After wrapping: FSDP replaces parameters with sharded ones, so the optimizer must see these."""
    return [p for p in module.parameters() if p.requires_grad]


# ---- FSDP checkpoints and export ---------------------------------------------------------------

def _frozen_options(lora: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lora, **kw)


def save_sharded(ckpt_dir: Path, wrapped: nn.Module, opt: torch.optim.Optimizer, lora: bool,
                 meta: dict, is_main: bool) -> None:
    """Every rank writes its own shards, rank 0 then the JSON state, which names the shard folder.
    The shards go to the folder the current state does not name (``sharded/`` and ``sharded.1/`` take
    turns) and the state is replaced last, so a process killed at any point leaves the previous
    checkpoint whole."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(wrapped, opt, options=_frozen_options(lora))
    name = [None]
    if is_main:
        name[0] = SHARDED_DIR + ".1" if _shard_folder(ckpt_dir) == SHARDED_DIR else SHARDED_DIR
    dist.broadcast_object_list(name, src=0)
    shards = ckpt_dir / name[0]
    if is_main:
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(shards))
    dist.barrier()
    if is_main:
        state_tmp = ckpt_dir / (SHARDED_STATE + ".tmp")
        state_tmp.write_text(json.dumps({**meta, "shards": name[0]}, indent=2) + "\n")
        os.replace(state_tmp, ckpt_dir / SHARDED_STATE)
    dist.barrier()


def _shard_folder(ckpt_dir: Path) -> str | None:
    """The shard folder the checkpoint's state names (``sharded`` for states written before it was
    recorded); None without a state."""
    path = ckpt_dir / SHARDED_STATE
    return json.loads(path.read_text()).get("shards", SHARDED_DIR) if path.exists() else None


def load_sharded(ckpt_dir: Path, wrapped: nn.Module, opt: torch.optim.Optimizer, lora: bool) -> dict:
    """Restore parameters and optimizer state written by ``save_sharded`` (any number of ranks may read
    it back: DCP re-shards); returns the JSON state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    saved = json.loads((ckpt_dir / SHARDED_STATE).read_text())
    model_sd, optim_sd = get_state_dict(wrapped, opt, options=_frozen_options(lora))
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt_dir / saved.get("shards", SHARDED_DIR)))
    set_state_dict(wrapped, opt, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_frozen_options(lora, strict=not lora))  # lora: the frozen base is not saved
    return saved


def full_state(wrapped: nn.Module, lora: bool, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The unsharded Decoder state on rank 0 (CPU; empty on other ranks). Called on every rank: it is a
    collective. Keys are the Decoder's own (``prefix`` of the objective stripped); LoRA mode gathers the
    trainable tensors only."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(wrapped, options=_frozen_options(lora, full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(prefix): v for k, v in sd.items()}
