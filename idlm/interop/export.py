"""``idlm export``: a converted model laid out for serving engines other than idlm's own.

* ``vllm``: a plain HF folder that vLLM loads as a *draft model* with parallel drafting. ``mask_token_id``
  in config.json tells vLLM which input id fills the draft slots; its ``draft_model`` proposer feeds
  ``[..., last token, MASK x (k-1)]`` and reads k drafts from those slots, which is I-DLM's layout (the last
  clean token predicts the next token, the j-th MASK the one j later). The target is the base model, so
  vLLM's rejection sampler keeps the output the base model's. vLLM needs the drafter's vocabulary to equal
  the target's, so MASK must be an id inside the base vocabulary: Qwen's padded vocabularies have one
  (151669); for a vocabulary without spare rows, ``mask_id`` names an existing token whose embedding row
  carries the trained MASK row (that token then reads as MASK to the drafter, a drafting-quality cost only).
* ``sglang-idlm``: the reference I-DLM layout for the authors' SGLang fork (spec §1.1, §3.9, §5.1):
  ``SDARForCausalLM`` config keys, ``mask_token_id`` 151669, ``use_regular_causal``, and the
  ``IDLMBlockN`` algorithm YAML with ``block_size = 2N-1``, ``gen_block_size = N``.

Both take a ``--mode full`` conversion (all weights trained). The gated R-ISD adapter needs a per-token gate
inside every projection, which neither engine's draft path has; ``--mode lora`` models are refused with
that reason. Nothing here loads a model: config JSON and safetensors are rewritten directly.
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import QWEN_MASK_TOKEN_ID
from ..model.converted import META_FILE, ConvertedMeta
from ..model.loading import resolve_folder
from ..train.checkpoint import copy_tokenizer_files, save_json, save_safetensors

TARGETS = ("vllm", "sglang-idlm")
EMBED_KEY = "model.embed_tokens.weight"
# The reference checkpoints carry the SDAR modelling code (configuration_sdar.py / modeling_sdar.py) for
# --trust-remote-code; an exported folder points at the reference I-DLM-8B repository's copy instead.
SDAR_CODE_REPO = "yifanyu/I-DLM-8B"
SDAR_AUTO_MAP = {"AutoConfig": f"{SDAR_CODE_REPO}--configuration_sdar.SDARConfig",
                 "AutoModelForCausalLM": f"{SDAR_CODE_REPO}--modeling_sdar.SDARForCausalLM"}


class ExportError(ValueError):
    """The converted model cannot be exported for that engine (printed as one line)."""


@dataclass(frozen=True)
class EngineExport:
    """What ``export_for`` wrote and how to launch it."""

    target: str  # vllm | sglang-idlm
    out: Path  # the written folder
    command: str  # the launch command
    files: tuple[str, ...]  # files written into ``out``
    notes: tuple[str, ...] = ()  # what the route cannot do / what the user should know


def export_for(target: str, converted: str | Path, out: str | Path, *, stride: int | None = None,
               mask_id: int | None = None, temperature: float = 1.0) -> EngineExport:
    """Write ``converted`` (an ``idlm convert --mode full`` folder) for ``target`` into ``out``."""
    if target not in TARGETS:
        raise ExportError(f"--to must be one of {', '.join(TARGETS)}, got {target!r}")
    src = Path(converted).expanduser()
    if not (src / META_FILE).exists():
        raise ExportError(f"{src} is not an `idlm convert` output folder (no {META_FILE})")
    meta = ConvertedMeta.read(src)
    if meta.mode != "full":
        raise ExportError(f"{src} is a --mode {meta.mode} conversion: the gated R-ISD adapter switches LoRA on "
                          "per token (MASK slots only), which vLLM's and SGLang's draft paths cannot do; export a "
                          "--mode full conversion, or serve this one with `idlm serve`")
    if meta.attention != "causal":
        raise ExportError(f"{src} was trained with --attention {meta.attention}; both engines draft with "
                          "causal attention, as I-DLM trains")
    n = stride or meta.stride
    if not 2 <= n <= 16:
        raise ExportError(f"--stride must be in 2..16, got {n}")
    dst = Path(out).expanduser()
    if dst.resolve() == src.resolve():
        raise ExportError("the output folder must differ from the converted model's folder")
    conf = json.loads((src / "config.json").read_text())
    if target == "vllm":
        return _vllm(src, dst, conf, meta, n, mask_id)
    return _sglang(src, dst, conf, meta, n, temperature)


def _weights(src: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{src} has no *.safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def _write_weights(src: Path, dst: Path, edited: dict[str, torch.Tensor] | None = None) -> None:
    """``dst/model.safetensors``: ``edited`` when given, else the converted model's weights as they are (a file
    copy where `idlm convert` wrote one file, which it does)."""
    dst.mkdir(parents=True, exist_ok=True)
    if edited is None and (src / "model.safetensors").exists():
        shutil.copyfile(src / "model.safetensors", dst / "model.safetensors")
    else:
        save_safetensors(_weights(src) if edited is None else edited, dst / "model.safetensors")


def _vllm(src: Path, dst: Path, conf: dict, meta: ConvertedMeta, n: int, mask_id: int | None) -> EngineExport:
    vocab = int(conf["vocab_size"])
    base = _base_folder(meta)
    base_conf = json.loads((Path(base) / "config.json").read_text()) if Path(base).is_dir() else None
    if base_conf is not None and int(base_conf["vocab_size"]) != vocab:
        raise ExportError(f"the base model's vocabulary ({base_conf['vocab_size']}) differs from the drafter's "
                          f"({vocab}); vLLM needs them equal")
    notes = []
    if meta.mask_token_id < vocab:  # MASK already has a row of the vocabulary (Qwen: 151669)
        if mask_id is not None and mask_id != meta.mask_token_id:
            raise ExportError(f"--mask-id: this model's MASK is already vocabulary id {meta.mask_token_id}")
        mask, edited = meta.mask_token_id, None
        notes.append(f"MASK is vocabulary id {mask}; the drafter may propose it, and the target then rejects it")
    else:  # MASK is an appended row: vLLM needs the draft vocabulary to equal the target's
        if mask_id is None:
            raise ExportError(f"this model's MASK is an appended embedding row (id {meta.mask_token_id}, vocabulary "
                              f"{vocab}); vLLM needs the drafter's vocabulary to equal the base model's, so pass "
                              "--mask-id ID: an existing token, ideally one that never occurs in your prompts, whose "
                              "row will carry the MASK embedding")
        if not 0 <= mask_id < vocab:
            raise ExportError(f"--mask-id must be in 0..{vocab - 1}, got {mask_id}")
        mask, edited = mask_id, _weights(src)
        embed = edited[EMBED_KEY][:vocab].clone()
        embed[mask] = edited[EMBED_KEY][meta.mask_token_id]
        edited[EMBED_KEY] = embed
        tied = conf.get("tie_word_embeddings", False)
        notes.append(f"token {mask} now reads as MASK to the drafter" + (" (tied embeddings: its output row "
                     "changed too)" if tied else "") + "; drafts around it are weaker, the output is unchanged")
    _write_weights(src, dst, edited)
    save_json({**conf, "mask_token_id": mask}, dst / "config.json")
    files = ["model.safetensors", "config.json", *copy_tokenizer_files(src, dst)]
    spec = {"method": "draft_model", "model": str(dst.resolve()), "num_speculative_tokens": n,
            "parallel_drafting": True}
    command = f"vllm serve {shlex.quote(str(base))} --speculative-config {shlex.quote(json.dumps(spec))}"
    notes += [(f"num_speculative_tokens = N = {n}: the last token's prediction and N-1 MASK drafts per drafter "
              "forward, as ISD stride N"),
              "vLLM runs the drafter and the target as two forwards per step; ISD fuses them into one",
              "temperature 0 output equals the base model's greedy output (vLLM's rejection sampler)"]
    return EngineExport("vllm", dst, command, tuple(files), tuple(notes))


def _base_folder(meta: ConvertedMeta) -> str:
    """Where the target (the base model) lives: a local folder when it resolves to one, else the hub id."""
    try:
        return str(resolve_folder(meta.base_model))
    except Exception:  # noqa: BLE001 - an unreachable hub id is still the right thing to print
        return meta.base_model


def sglang_config(conf: dict, block: int) -> dict:
    """The reference checkpoint's config (spec §1.1): Qwen3's keys under the SDAR class, plus the I-DLM keys."""
    out = {k: v for k, v in conf.items() if k not in ("architectures", "model_type", "auto_map")}
    out.update({"architectures": ["SDARForCausalLM"], "model_type": "sdar", "auto_map": dict(SDAR_AUTO_MAP),
                "block_size": block, "mask_token_id": QWEN_MASK_TOKEN_ID, "fuse_cross_entropy": True,
                "attn_implementation": "flex_attention", "use_regular_causal": True})
    return out


def sglang_algorithm_yaml(n: int, temperature: float) -> str:
    """``--dllm-algorithm IDLMBlockN`` config (spec §3.9): window 2N-1, N tokens per step at most."""
    lines = [f"# IDLMBlockN at stride N = {n} (written by `idlm export --to sglang-idlm`)",
             f"block_size: {2 * n - 1}", f"gen_block_size: {n}", f"temperature: {temperature}",
             "top_k: 50", "top_p: 0.95", "use_spec_verify: true"]
    return "\n".join(lines) + "\n"


def _sglang(src: Path, dst: Path, conf: dict, meta: ConvertedMeta, n: int, temperature: float) -> EngineExport:
    if conf.get("model_type") not in ("qwen3", "sdar"):
        raise ExportError(f"the reference SGLang route serves Qwen3 models (SDARForCausalLM is Qwen3 layer for "
                          f"layer); this model is {conf.get('model_type')!r}: use `idlm serve` or --to vllm")
    if meta.mask_token_id != QWEN_MASK_TOKEN_ID:
        raise ExportError(f"SGLang's IDLMBlockN hard-codes MASK = {QWEN_MASK_TOKEN_ID} (Qwen's <|MASK|>); this "
                          f"model was trained with MASK = {meta.mask_token_id}")
    _write_weights(src, dst)
    save_json(sglang_config(conf, meta.block_size), dst / "config.json")
    yaml_name = f"idlm_blockN{n}_config.yaml"
    (dst / yaml_name).write_text(sglang_algorithm_yaml(n, temperature))
    files = ["model.safetensors", "config.json", yaml_name, *copy_tokenizer_files(src, dst)]
    command = (f"python -m sglang.launch_server --model-path {shlex.quote(str(dst.resolve()))} --trust-remote-code "
               "--tp-size 1 --dtype bfloat16 --mem-fraction-static 0.85 --max-running-requests 32 "
               "--attention-backend flashinfer --dllm-algorithm IDLMBlockN "
               f"--dllm-algorithm-config {shlex.quote(str((dst / yaml_name).resolve()))} --port 30000")
    notes = (("needs the I-DLM authors' SGLang fork (`pip install -e inference/sglang` in their repository) and a "
             "GPU with SM >= 8.0"),
             (f"--trust-remote-code fetches the SDAR modelling code from {SDAR_CODE_REPO}; offline, copy its "
             "configuration_sdar.py and modeling_sdar.py into this folder and drop the repository prefix in "
             "config.json's auto_map"),
             "without --max-running-requests the fork serves one request at a time")
    return EngineExport("sglang-idlm", dst, command, tuple(files), notes)
