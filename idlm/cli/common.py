"""Flag groups several subcommands share (sampling, ISD, engine limits) and the CLI's side of loading: the
one-line reports on stderr."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..config import ConfigError, DecodeConfig, SamplingParams, opt
from ..model import LoadedModel, load_for_inference

FALLBACKS = {"on": True, "off": False, "auto": "auto"}


@dataclass(frozen=True)
class SamplingFlags:
    """How tokens are chosen (``SamplingParams``)."""

    temperature: float = 0.0  # 0 = greedy; > 0 samples
    top_p: float = 1.0  # nucleus sampling mass in (0, 1] (1 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    seed: int | None = None  # RNG seed for sampling
    max_new_tokens: int = 256  # generated token cap

    def params(self, **over) -> SamplingParams:
        kw = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
              "max_new_tokens": self.max_new_tokens, **over}
        return SamplingParams(**kw)


@dataclass(frozen=True)
class IsdFlags:
    """The ISD knobs of one decoding configuration (``DecodeConfig``)."""

    stride: str = "3"  # ISD stride N in 2..8: tokens a forward can commit; 'auto' lets the engine choose N each
    #   step from the load
    pad_windows: bool = False  # pad every ISD window to its largest size like the GPU reference (wasted work on CPU)
    fallback: str = opt("auto", choices=tuple(FALLBACKS))  # fallback drafts: each window also drafts for every
    #   possible rejection, so a rejected draft costs no cold step; auto = the engine adds them only while they pay
    #   for their rows (the batch-1 decoders: always). Never changes the output
    tree: int = 0  # draft trees: at most K extra branches per window (N-1 rows each), each starting with the
    #   drafter's second choice for a draft it is unsure of, so a rejection whose correction is that choice still
    #   verifies the next drafts (0 = off). Never changes the output
    sampling_mode: str = opt("exact", choices=("exact", "coupled", "reference"))  # how T > 0 drafts are judged.
    #   exact: sampled drafts + speculative-sampling test; coupled: each token's randomness is keyed by (seed,
    #   position), so a seeded request gives the same tokens with AR or ISD at any stride, alone or batched; both
    #   are distributed exactly as AR sampling. reference: argmax drafts as in the reference system (approximate)

    def decode(self, mode: str = "isd", stride: str | int | None = None, fallback: str | None = None,
               tree: int | None = None) -> DecodeConfig:
        """The DecodeConfig these flags give (``stride`` / ``fallback`` / ``tree`` override one list item)."""
        tree = self.tree if tree is None else tree
        return DecodeConfig(mode=mode, stride=parse_stride(self.stride if stride is None else stride),
                            pad_windows=self.pad_windows, sampling_mode=self.sampling_mode,
                            fallback=parse_fallback(fallback or self.fallback), tree=tree if mode == "isd" else 0)


def parse_stride(text: str | int) -> int | str:
    if text == "auto" or isinstance(text, int):
        return text
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--stride must be an integer in 2..8 or 'auto', got {text!r}", "stride") from None


def parse_fallback(text: str) -> bool | str:
    if text not in FALLBACKS:
        raise ConfigError(f"--fallback takes on, off or auto, got {text!r}", "fallback")
    return FALLBACKS[text]


def parse_list(text: str, flag: str, parse=int) -> list:
    """``"1,4,8"`` -> [1, 4, 8]; one error line naming the flag otherwise."""
    try:
        out = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list, got {text!r}") from None
    if not out:
        raise ConfigError(f"{flag} is empty")
    return out


def load(opts, default_dtype: str = "bf16", attention_note: bool = True) -> LoadedModel:
    """``load_for_inference``, then what the load decided on stderr, one ``idlm:`` line each."""
    lm = load_for_inference(opts, default_dtype)
    for line in lm.report(attention_note):
        print(f"idlm: {line}", file=sys.stderr)
    return lm


def short_forward(lm: LoadedModel) -> str:
    """"native" / "python": the first word of the forward's description, for tables."""
    return lm.forward.split(" ")[0]
