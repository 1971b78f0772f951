"""Throughput bench and losslessness check: our AR, our ISD and transformers' ``generate`` on the same
prompts, in one process, one after the other, so the ratios are measured side by side."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..config import DecodeConfig, SamplingParams
from ..decode import ar_generate, isd_generate
from ..metrics import DecodeStats
from ..model import LoadedModel


@dataclass
class ModeResult:
    mode: str  # ar | isd | hf
    stride: int  # N (1 for ar / hf)
    fallback: bool = False  # ISD with fallback drafts
    tokens: int = 0
    forwards: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)  # generated ids per prompt
    stats: list[DecodeStats] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def tpf(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def acceptance_at(self) -> list[float]:
        tested = [sum(s.tested_at[j] for s in self.stats) for j in range(self.stride - 1)]
        acc = [sum(s.accepted_at[j] for s in self.stats) for j in range(self.stride - 1)]
        return [a / t if t else 0.0 for a, t in zip(acc, tested)]

    def to_json(self) -> dict:
        d = {"mode": self.mode, "stride": self.stride, "tokens_per_s": round(self.tokens_per_s, 3),
             "tpf": round(self.tpf, 4), "forwards": self.forwards, "tokens": self.tokens,
             "seconds": round(self.seconds, 3)}
        if self.mode == "isd":
            d["fallback"] = self.fallback
            d["acceptance_at"] = [round(x, 4) for x in self.acceptance_at()]
        return d


def run_ours(lm: LoadedModel, prompts: list[list[int]], cfg: DecodeConfig, params: SamplingParams,
             desc: str) -> ModeResult:
    res = ModeResult(cfg.mode, cfg.stride if cfg.mode == "isd" else 1, cfg.mode == "isd" and cfg.fallback)
    for ids in tqdm(prompts, desc=desc, leave=False):
        out = isd_generate(lm.model, ids, cfg, params) if cfg.mode == "isd" else ar_generate(lm.model, ids, params)
        res.tokens += out.stats.tokens
        res.forwards += out.stats.forwards
        res.seconds += out.stats.seconds
        res.outputs.append(out.tokens)
        res.stats.append(out.stats)
    return res


def run_hf(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams, dtype: torch.dtype) -> ModeResult:
    """transformers' greedy ``generate`` on the same weights (the folder our model was loaded from)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = AutoModelForCausalLM.from_pretrained(str(lm.folder), dtype=dtype).eval()
    eos = None if params.ignore_eos else list(lm.model.cfg.eos_token_ids) or None
    res = ModeResult("hf", 1)
    for ids in tqdm(prompts, desc="hf", leave=False):
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_new_tokens,
                            do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        dt = time.perf_counter() - t
        new = y[0, len(ids):].tolist()
        res.tokens += len(new)
        res.forwards += len(new)
        res.seconds += dt
        res.outputs.append(new)
    return res


def forward_cost(lm: LoadedModel, prefix: int, windows: list[int], reps: int = 20) -> list[dict]:
    """Median wall time of one forward (hidden + logits at every window slot) appending ``w`` tokens to a
    ``prefix``-token cache, for each w; windows are measured interleaved so machine noise hits all alike."""
    model = lm.model
    cache = model.new_cache(capacity=prefix + max(windows) + 1)
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    times: dict[int, list[float]] = {w: [] for w in windows}
    with torch.inference_mode():
        model.hidden(torch.randint(0, vocab, (prefix,), generator=gen), torch.arange(prefix), cache)
        for rep in range(reps + 2):
            for w in windows:
                ids = torch.randint(0, vocab, (w,), generator=gen)
                t = time.perf_counter()
                model.logits(model.hidden(ids, prefix + torch.arange(w), cache)[0])
                dt = time.perf_counter() - t
                cache.crop(prefix)
                if rep >= 2:  # two warm-up rounds
                    times[w].append(dt)
    med = {w: sorted(ts)[len(ts) // 2] for w, ts in times.items()}
    base = med.get(1) or med[windows[0]]
    return [{"window": w, "ms": round(1000 * med[w], 2), "ratio_vs_1": round(med[w] / base, 3)} for w in windows]
