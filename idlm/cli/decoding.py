"""`idlm generate`, `idlm verify` and `idlm demo`: decode prompts with ISD and AR and print text and stats."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, DecodeConfig, EngineConfig, ModelOptions, SamplingParams, opt
from ..engine import LLMEngine
from ..model import LoadedModel
from .common import IsdFlags, SamplingFlags, load, short_forward


@dataclass(frozen=True)
class GenerateArgs:
    """Decode one prompt and print the text and decoding stats."""

    prompt: str  # prompt text
    chat: bool = False  # wrap the prompt in the model's chat template
    mode: str = opt("isd", choices=("isd", "ar"))  # decoder
    isd: IsdFlags = field(default_factory=IsdFlags)
    sampling: SamplingFlags = field(default_factory=SamplingFlags)
    load: ModelOptions = field(default_factory=ModelOptions)
    json: bool = False  # end with one JSON line of text and stats


def cmd_generate(a: GenerateArgs) -> int:
    from ..eval.prompts import encode
    from ..text import IncrementalDetokenizer

    if not a.prompt.strip():
        raise ConfigError("--prompt is empty")
    params = a.sampling.params()
    cfg = a.isd.decode(a.mode)
    lm = load(a.load)
    tok = lm.tokenizer()
    ids = encode(tok, a.prompt, a.chat)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    engine = LLMEngine(lm.model, EngineConfig(max_running=1))
    rid = engine.add_request(ids, params, cfg)
    detok = IncrementalDetokenizer(tok)
    while engine.has_unfinished():
        for out in engine.step():
            piece = detok.push(out.new_token_ids)
            if not a.json and piece:
                print(piece, end="", flush=True)
    done = engine.completion(rid)
    if not a.json:
        print(detok.flush())
    _report_generate(a, lm, cfg, done, tok.decode(done.token_ids, skip_special_tokens=True))
    return 0


def _report_generate(a: GenerateArgs, lm: LoadedModel, cfg: DecodeConfig, done, text: str) -> None:
    s = done.stats
    acc = " ".join(f"{x:.2f}" for x in s.acceptance_at) or "-"
    stride = cfg.stride if cfg.mode == "isd" else 1
    print(f"[{cfg.mode} N={stride}] {s.tokens} tokens, {s.forwards} forwards, TPF {s.tpf:.2f}, "
          f"{s.tokens_per_s:.1f} tok/s, acceptance by draft position {acc}, rejects {s.rejects}, "
          f"cold steps {s.cold_steps}, finish {done.finish_reason}", file=sys.stderr)
    if a.json:
        print(json.dumps({"text": text, "tokens": s.tokens, "forwards": s.forwards, "tpf": round(s.tpf, 4),
                          "tokens_per_s": round(s.tokens_per_s, 3), "mode": cfg.mode, "stride": stride,
                          "max_stride": cfg.max_stride, "finish_reason": done.finish_reason, "model": lm.name,
                          "dtype": lm.dtype_name, "stats": s.to_dict()}))


@dataclass(frozen=True)
class VerifyArgs:
    """Run greedy ISD and greedy AR on K built-in chat prompts; the last line is the fraction of identical
    outputs. Exit status 1 unless it is 1.0."""

    prompts: int = 4  # number of built-in prompts (max 16)
    max_new_tokens: int = 128  # tokens per prompt
    isd: IsdFlags = field(default_factory=IsdFlags)  # (greedy: no --sampling-mode)
    load: ModelOptions = field(default_factory=ModelOptions)


def cmd_verify(a: VerifyArgs) -> int:
    from ..decode import ar_generate
    from ..eval.prompts import BUILTIN_PROMPTS, encode
    from ..model.native import cpu_description

    if not 1 <= a.prompts <= len(BUILTIN_PROMPTS):
        raise ConfigError(f"--prompts must be in 1..{len(BUILTIN_PROMPTS)}")
    params = SamplingParams(max_new_tokens=a.max_new_tokens)
    cfg = a.isd.decode()
    lm = load(a.load, "fp32")
    print(f"cpu: {cpu_description()}, {torch.get_num_threads()} threads")
    print(f"forward: {lm.forward}; dtype {lm.dtype_name}, quant {lm.quant_mode}")
    for r in lm.rowcheck.results if lm.rowcheck is not None else []:
        print(f"  {r.line()}")
    tok = lm.tokenizer()
    prompts = [encode(tok, p, chat=True) for p in BUILTIN_PROMPTS[: a.prompts]]
    engine = LLMEngine(lm.model, EngineConfig(max_running=len(prompts)))
    isd = engine.generate(prompts, params, cfg, progress=sys.stderr.isatty())  # all in one batch
    same = 0
    for i, (ids, got) in enumerate(zip(prompts, isd)):
        ref = ar_generate(lm.model, ids, params).tokens  # the batch-1 AR decoder, alone
        if ref == got.token_ids:
            same += 1
            print(f"prompt {i}: identical ({len(ref)} tokens)")
        else:
            first = next((k for k, (x, y) in enumerate(zip(ref, got.token_ids)) if x != y),
                         min(len(ref), len(got.token_ids)))
            print(f"prompt {i}: DIFFERENT at token {first}")
    print(f"engine ISD N={cfg.stride}, {len(prompts)} requests in one batch, TPF {engine.metrics.tpf:.3f}, "
          f"dtype {lm.dtype_name}")
    print(f"{same / len(prompts):.4g}")
    return 0 if same == len(prompts) else 1


DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?"),
]


@dataclass(frozen=True)
class DemoArgs:
    """The quick-start job: a few chat prompts with ISD and AR side by side."""

    max_new_tokens: int = 96  # tokens per prompt
    isd: IsdFlags = field(default_factory=IsdFlags)  # (greedy: no --sampling-mode)
    load: ModelOptions = field(default_factory=ModelOptions)


def cmd_demo(a: DemoArgs) -> int:
    from ..decode import ar_generate
    from ..eval.prompts import encode

    cfg = a.isd.decode()
    lm = load(a.load)
    tok = lm.tokenizer()
    params = SamplingParams(max_new_tokens=a.max_new_tokens)
    _demo_header(lm, cfg)
    engine = LLMEngine(lm.model, EngineConfig(max_running=1))
    engine.generate([encode(tok, DEMO_PROMPTS[0], chat=True)[:16]], SamplingParams(max_new_tokens=4), cfg)  # warm-up
    for text in DEMO_PROMPTS:
        ids = encode(tok, text, chat=True)
        isd = engine.generate([ids], params, cfg)[0]
        ar = engine.generate([ids], params, DecodeConfig(mode="ar"))[0]
        same = isd.token_ids == ar.token_ids == ar_generate(lm.model, ids, params).tokens
        print(f"Q: {text}")
        print(f"A: {tok.decode(isd.token_ids, skip_special_tokens=True).strip()}")
        r, s = ar.stats, isd.stats
        print(f"   ISD: {s.tokens} tokens in {s.forwards} forwards, TPF {s.tpf:.2f}, {s.tokens_per_s:.1f} tok/s | "
              f"AR: TPF 1.00, {r.tokens_per_s:.1f} tok/s | ISD/AR speed {s.tokens_per_s / r.tokens_per_s:.2f}x | "
              f"identical to AR: {'yes' if same else 'NO'}\n")
    return 0


def _demo_header(lm: LoadedModel, cfg: DecodeConfig) -> None:
    print(f"model: {lm.name} ({lm.dtype_name}, quant {lm.quant_mode}, {short_forward(lm)} forward), "
          f"ISD stride N={cfg.stride}, greedy, {torch.get_num_threads()} threads")
    if lm.meta is None:
        print("note: this is the base model with no converted I-DLM drafter, so its MASK drafts are rarely "
              "accepted and TPF stays near 1; ISD output is still identical to AR.\n")
    else:
        m = lm.meta
        print(f"drafter: R-ISD gated LoRA (rank {m.lora_rank}, trained {m.steps} steps at block {m.block_size}); "
              f"the anchor is exactly the base model, so ISD output equals the base model's greedy output.\n")
