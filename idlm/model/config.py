"""Model configuration: one frozen dataclass for the Llama / Qwen2 / Qwen3 (and SDAR = Qwen3) families.

Owns parsing of a Hugging Face ``config.json`` dict (transformers 4.x and 5.x spellings of RoPE
parameters) and the choice of the MASK token id. Touches no files or devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Families whose layer layout we implement. "sdar" is the reference I-DLM checkpoint class
# (SDARForCausalLM): layer for layer it is Qwen3.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "sdar")
QWEN_MASK_TOKEN_ID = 151669  # <|MASK|> of the reference I-DLM (first free id after </think>)
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint is of an architecture or variant this package does not implement."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str  # llama | qwen2 | qwen3 (sdar is read as qwen3)
    vocab_size: int  # rows of the output head = size of the anchor distribution p
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when < num_heads)
    head_dim: int
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": ..., factor, ...}; None = default RoPE
    max_position_embeddings: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: True)
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    mask_token_id: int = 0  # input id of MASK (see resolve_mask_token_id)
    num_embeddings: int = 0  # rows of the input embedding; vocab_size + 1 when MASK is an appended row
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.model_type not in ("llama", "qwen2", "qwen3"):
            raise UnsupportedModelError(f"unsupported model_type {self.model_type!r}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_embeddings < self.vocab_size:
            object.__setattr__(self, "num_embeddings", self.vocab_size)
        if not 0 <= self.mask_token_id < self.num_embeddings:
            raise ValueError(f"mask_token_id {self.mask_token_id} outside the embedding ({self.num_embeddings} rows)")

    @property
    def mask_is_new_row(self) -> bool:
        """True when MASK is an extra embedding row that the output head never scores."""
        return self.mask_token_id >= self.vocab_size

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, d: dict[str, Any], mask_token_id: int | None = None) -> ModelConfig:
        """Build from a transformers ``config.json`` dict (llama, qwen2, qwen3 or sdar)."""
        mt = d.get("model_type", "")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"unsupported architecture {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        family = "qwen3" if mt == "sdar" else mt
        if d.get("use_sliding_window"):
            raise UnsupportedModelError("sliding-window attention is not supported")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        theta, scaling = _rope_params(d)
        vocab = d["vocab_size"]
        eos = d.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        mask_id = resolve_mask_token_id(family, vocab, d.get("mask_token_id", mask_token_id))
        bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=family,
            vocab_size=vocab,
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else bias,
            o_bias=bias if family in ("llama", "qwen3") else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if family == "llama" else False,
            qk_norm=family == "qwen3",
            mask_token_id=mask_id,
            num_embeddings=max(vocab, mask_id + 1),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def resolve_mask_token_id(family: str, vocab_size: int, explicit: int | None) -> int:
    """Pick the MASK input id.

    - An explicit id (``mask_token_id`` in the converted model's config) always wins.
    - Qwen vocabularies (padded to >= 151670 rows) use 151669, as the reference I-DLM does.
    - Any other vocabulary gets a new embedding row appended at id ``vocab_size``; the output head
      never scores it, so MASK can never enter the anchor distribution p.
    """
    if explicit is not None:
        return int(explicit)
    if family in ("qwen2", "qwen3") and vocab_size > QWEN_MASK_TOKEN_ID:
        return QWEN_MASK_TOKEN_ID
    return vocab_size


def _rope_params(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Read RoPE theta and scaling from either ``rope_parameters`` (transformers 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4)."""
    params = dict(d.get("rope_parameters") or {})
    legacy = d.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", d.get("rope_theta", 10000.0)))
    merged = {**legacy, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported RoPE scaling {rope_type!r} (supported: {', '.join(ROPE_TYPES)})")
    merged["rope_type"] = rope_type
    merged.pop("type", None)
    return theta, merged
