"""Frozen, validated configuration dataclasses shared across modules.

Validation errors are ``ConfigError`` (a ValueError) whose message names the offending flag and whose
``field`` attribute names the dataclass field, so the CLI prints one clear line and the engine's
callers (the server) can map it to their own parameter names. Nothing here reads files or touches
devices; ``cache_dir`` only names the folder where idlm keeps what it builds (native kernels, GGUF conversions,
stride-calibration costs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_STRIDE, MAX_STRIDE = 2, 8
AUTO = "auto"
AUTO_MAX_STRIDE = 4  # --stride auto chooses N in 1..this each step
SAMPLING_MODES = ("exact", "coupled", "reference")
MAX_LOGPROBS = 20
QUANT_MODES = ("none", "int8", "int4", "w8a8", "w4a8")  # idlm/model/quant.py: weight-only, or with int8 activations
# auto: int4 on the CPU when the weights come from a GGUF whose projections are Q4_0 / Q4_1 / Q4_K blocks (packed as
# they are: nothing lost beyond the file's own quantization; the fastest measured here), else none
QUANT_CHOICES = ("auto", *QUANT_MODES)
QUANT_DEFAULT = "auto"
DTYPE_CHOICES = ("fp32", "bf16")
KV_BLOCK_DIVIDES = 128  # --block-size must divide this (model.attention.KEY_BLOCK, the key padding quantum)


def opt(default: Any = None, *, choices: tuple | None = None, metavar: str | None = None,
        positional: bool = False, required: bool = False) -> Any:
    """A dataclass field with how its command-line flag looks (the CLI reads the metadata; the field's trailing
    comment is the flag's --help text). ``required``: no default (the flag must be given)."""
    meta = {k: v for k, v in {"choices": choices, "metavar": metavar, "positional": positional}.items() if v}
    return field(metadata=meta) if required else field(default=default, metadata=meta)


def cache_dir() -> Path:
    """$IDLM_CACHE, else ~/.cache/idlm (not created here)."""
    return Path(os.environ.get("IDLM_CACHE", Path.home() / ".cache" / "idlm"))


class ConfigError(ValueError):
    """A user-supplied setting is out of range; the message names the flag, ``field`` the field."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _finite(name: str, flag: str, v: float) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v) or math.isinf(v):
        raise ConfigError(f"{flag} must be a finite number, got {v!r}", name)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature 0 = greedy (top-k / top-p then have no effect)."""

    temperature: float = 0.0  # --temperature: 0 = greedy; > 0 scales logits by 1/T before sampling
    top_k: int = 0  # --top-k: keep the k most likely tokens (0 = off)
    top_p: float = 1.0  # --top-p: keep the smallest set with cumulative probability >= p (1 = off)
    seed: int | None = None  # --seed: per-request RNG seed (None = nondeterministic)
    max_new_tokens: int = 256  # --max-new-tokens: hard cap on generated tokens
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)  # extra ids that end generation (kept)
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    logprobs: int | None = None  # return each token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # also score every prompt token (and this many alternatives) on the causal path

    def __post_init__(self) -> None:
        _finite("temperature", "--temperature", self.temperature)
        _finite("top_p", "--top-p", self.top_p)
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}", "top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0, got {self.top_k!r}", "top_k")
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be an integer >= 1, got {self.max_new_tokens!r}",
                              "max_new_tokens")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed!r}", "seed")
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ConfigError(f"stop token ids must be non-negative integers, got {self.stop_token_ids!r}",
                              "stop_token_ids")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ConfigError(f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}", "logprobs")
        if self.prompt_logprobs is not None and (not _is_int(self.prompt_logprobs)
                                                 or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS):
            raise ConfigError(f"prompt_logprobs must be an integer in 0..{MAX_LOGPROBS}, "
                              f"got {self.prompt_logprobs!r}", "prompt_logprobs")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class DecodeConfig:
    """Which decoder runs and its ISD knobs (spec §3)."""

    mode: str = "isd"  # --mode: isd (introspective strided decoding) or ar (one token per forward)
    stride: int | str = 3  # --stride: N = tokens a forward can commit (1 anchor + N-1 drafts), 2..8, or auto
    pad_windows: bool = False  # --pad-windows: pad every window to its largest size like the GPU reference
    fallback: bool | str = AUTO  # --fallback on|off|auto: also draft for each possible rejection, so none costs a
    # cold step; auto = the engine decides each step from the load (batch-1 decoders: on). Never changes the output.
    sampling_mode: str = "exact"  # --sampling-mode: exact | coupled (both distribution-preserving) | reference
    mask_token_id: int | None = None  # MASK input id; None = the model's own
    tree: int = 0  # --tree K: draft trees, at most K extra branches per window (N-1 rows each) that start with the
    # drafter's second choice where it is unsure; 0 = off. Never changes the output.

    def __post_init__(self) -> None:
        if self.mode not in ("isd", "ar"):
            raise ConfigError(f"--mode must be 'isd' or 'ar', got {self.mode!r}", "mode")
        if self.stride != AUTO and (not _is_int(self.stride) or not MIN_STRIDE <= self.stride <= MAX_STRIDE):
            raise ConfigError(f"--stride must be an integer in {MIN_STRIDE}..{MAX_STRIDE} or 'auto', "
                              f"got {self.stride!r}", "stride")
        if self.fallback not in (True, False, AUTO):
            raise ConfigError(f"--fallback must be on, off or auto, got {self.fallback!r}", "fallback")
        if not _is_int(self.tree) or not 0 <= self.tree <= MAX_STRIDE - 1:
            raise ConfigError(f"--tree must be an integer in 0..{MAX_STRIDE - 1}, got {self.tree!r}", "tree")
        if self.sampling_mode not in SAMPLING_MODES:
            raise ConfigError(f"--sampling-mode must be one of {SAMPLING_MODES}, got {self.sampling_mode!r}",
                              "sampling_mode")

    @property
    def auto(self) -> bool:
        """N is chosen per step by the engine from the load (``--stride auto``)."""
        return self.stride == AUTO

    @property
    def may_fallback(self) -> bool:
        """Fallback branches allowed (on, or auto: the batch-1 decoders then always use them)."""
        return self.fallback is not False

    @property
    def adaptive(self) -> bool:
        """The engine chooses this request's window each step (auto stride or auto fallback)."""
        return self.mode == "isd" and (self.auto or self.fallback == AUTO)

    @property
    def max_stride(self) -> int:
        """The largest N a step may use: 1 for AR, the stride, or the auto ceiling."""
        if self.mode == "ar":
            return 1
        return AUTO_MAX_STRIDE if self.auto else int(self.stride)

    @property
    def n_drafts(self) -> int:
        return self.max_stride - 1

    @property
    def window(self) -> int:
        """The largest window: pending + N-1 specs + N-1 MASKs (2N - 1), plus N-1 fallback MASKs for
        each of the N-1 specs that could be rejected when ``fallback`` is on, plus N-1 slots per tree branch."""
        return 2 * self.max_stride - 1 + (self.n_drafts ** 2 if self.may_fallback else 0) \
            + min(self.tree, self.n_drafts) * self.n_drafts


@dataclass(frozen=True)
class ModelOptions:
    """Which model an inference command loads, and how (``model.loading.load_for_inference``)."""

    model: str | None = opt(None, metavar="PATH_OR_ID")  # model folder, converted model, .gguf file or hub id
    #   (default: the embedded SmolLM2-135M-Instruct with the shipped R-ISD drafter; smollm2-135m-instruct = bare base)
    dtype: str | None = opt("bf16", choices=DTYPE_CHOICES)  # weight/activation dtype; greedy ISD reproduces greedy
    #   AR bit for bit in both (see README)
    quant: str = opt(QUANT_DEFAULT, choices=QUANT_CHOICES)  # quantization for the CPU (idlm's kernels; PyTorch's
    #   where no C++ compiler is found): int4 (groups of 32; a GGUF's Q4_0/Q4_1/Q4_K blocks packed as they are) or
    #   int8 (per row) weights with bf16 activations; w4a8 / w8a8: the same weights with activations in int8 per
    #   group of 32 (as llama.cpp runs a Q4 GGUF; needs idlm's kernels); none = the dense --dtype weights; auto =
    #   w4a8 (else int4) for a GGUF with Q4 blocks on the CPU, else none; greedy ISD == greedy AR of the same
    #   network in each
    draft_vocab: str = opt("auto", metavar="auto|full|K")  # tokens a MASK row may propose: K = the K most frequent
    #   in the drafter's training data (the model folder's draft_vocab.json, from `idlm data vocab`), full = all;
    #   auto = the file's measured K, or all without a file. Drafts only: the output never changes
    threads: int | None = None  # torch CPU threads (default: all cores)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}", "dtype")
        if self.quant not in QUANT_CHOICES:
            raise ConfigError(f"--quant must be one of {', '.join(QUANT_CHOICES)}, got {self.quant!r}", "quant")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 0):
            raise ConfigError(f"--threads must be >= 1, got {self.threads!r}", "threads")
        parse_draft_vocab(str(self.draft_vocab))


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits (``engine.LLMEngine``)."""

    max_running: int = 16  # requests decoding at once (the rest wait in a queue)
    max_batched_tokens: int = 512  # tokens per forward: decode windows first, long prompts are chunked into the rest
    block_size: int = 16  # tokens per KV block
    kv_cache_gb: float | None = None  # KV cache pool size in GiB (default: a quarter of free memory, at most 4,
    #   at most what max_running requests of max_model_len tokens can use)
    num_blocks: int | None = None  # exact KV pool size in blocks (overrides kv_cache_gb; tests)
    max_model_len: int | None = None  # context limit, prompt + output (default: the model's)

    def __post_init__(self) -> None:
        for name in ("max_running", "max_batched_tokens", "block_size"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}", name)
        if KV_BLOCK_DIVIDES % self.block_size:
            raise ConfigError(f"--block-size must divide {KV_BLOCK_DIVIDES}, got {self.block_size}", "block_size")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ConfigError(f"num_blocks must be >= 2, got {self.num_blocks}", "num_blocks")
        if self.kv_cache_gb is not None:
            _finite("kv_cache_gb", "--kv-cache-gb", self.kv_cache_gb)


SERVER_ENGINE_FLAGS = ("max_running", "kv_cache_gb", "max_batched_tokens", "max_model_len")  # EngineConfig's flags


@dataclass
class ServerConfig:
    """`idlm serve` settings: the model, the engine and the HTTP side. Field comments double as ``--help``
    texts."""

    load: ModelOptions = field(default_factory=ModelOptions)  # what to serve
    engine: EngineConfig = field(default_factory=EngineConfig)  # engine limits
    host: str = "127.0.0.1"  # address to bind (127.0.0.1: this machine only)
    port: int = 8000  # TCP port
    stride: int | str = "auto"  # ISD stride N in 2..8, or auto (the engine picks N each step from the load)
    mode: str = opt("isd", choices=("isd", "ar"))  # default decoder for requests that do not say: isd or ar
    tree: int = 0  # ISD draft trees: at most K extra branches per window from the drafter's second choices (0 = off)
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on /v1/*, /metrics and the tokenizer routes
    #   (default: $IDLM_API_KEY; none = open)
    max_queue: int = 64  # requests waiting beyond those; more are refused with 503 + Retry-After
    served_model_name: str | None = None  # the model id clients send and /v1/models lists (default: derived
    #   from --model)
    shutdown_timeout: float = 30.0  # on SIGTERM: seconds to let in-flight requests finish before aborting them
    max_body_bytes: int = 8 * 2 ** 20  # largest request body; bigger ones get 413

    def __post_init__(self) -> None:
        if isinstance(self.stride, str) and self.stride != AUTO:
            try:
                self.stride = int(self.stride)
            except ValueError:
                raise ConfigError(f"--stride must be an integer in {MIN_STRIDE}..{MAX_STRIDE} or 'auto', "
                                  f"got {self.stride!r}", "stride") from None
        DecodeConfig(mode=self.mode, stride=self.stride, tree=self.tree)  # the server's default decoding: same rules
        if not 0 < self.port < 65536:
            raise ConfigError(f"--port must be in 1..65535, got {self.port}", "port")
        if self.max_body_bytes < 1:
            raise ConfigError("--max-body-bytes must be >= 1", "max_body_bytes")
        if self.max_queue < 0 or self.shutdown_timeout < 0:
            raise ConfigError("--max-queue and --shutdown-timeout must be >= 0", "max_queue")
        if self.api_key == "":
            raise ConfigError("--api-key is empty", "api_key")

    @property
    def max_admitted(self) -> int:
        """Requests the server holds at once: running plus queued."""
        return self.engine.max_running + self.max_queue


def parse_draft_vocab(text: str) -> str | int:
    """``--draft-vocab`` text -> "auto", "full" or a token count K >= 1 (0 means full)."""
    if text in ("auto", "full"):
        return text
    try:
        k = int(text)
    except ValueError:
        raise ConfigError(f"--draft-vocab takes auto, full or a token count, got {text!r}", "draft_vocab") from None
    if k < 0:
        raise ConfigError(f"--draft-vocab must be >= 0, got {k}", "draft_vocab")
    return "full" if k == 0 else k
