"""One function per CLI subcommand: load the model, tokenize, run, print. Printing lives here;
algorithms live in decode/ and eval/."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .config import ConfigError, DecodeConfig, SamplingParams
from .model import LoadedModel, ModelLoadError, UnsupportedModelError, load_model

USER_ERRORS = (ConfigError, ModelLoadError, UnsupportedModelError, FileNotFoundError)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _setup(args: argparse.Namespace) -> LoadedModel:
    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        raise ConfigError("--threads must be >= 1")
    torch.set_num_threads(threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return load_model(args.model, dtype=DTYPES[args.dtype])


def _sampling(args: argparse.Namespace, **over) -> SamplingParams:
    kw = {"temperature": getattr(args, "temperature", 0.0), "top_p": getattr(args, "top_p", 1.0),
          "top_k": getattr(args, "top_k", 0), "seed": getattr(args, "seed", None),
          "max_new_tokens": args.max_new_tokens}
    kw.update(over)
    return SamplingParams(**kw)


def _decode_cfg(args: argparse.Namespace, stride: int, mode: str = "isd", fallback: bool | None = None) -> DecodeConfig:
    if fallback is None:
        fallback = getattr(args, "fallback", "on") != "off"
    return DecodeConfig(mode=mode, stride=stride, pad_windows=getattr(args, "pad_windows", False),
                        sampling_mode=getattr(args, "sampling_mode", "exact"), fallback=fallback)


def cmd_generate(args: argparse.Namespace) -> int:
    from .decode import generate
    from .eval.prompts import encode

    if not args.prompt.strip():
        raise ConfigError("--prompt is empty")
    params = _sampling(args)
    cfg = _decode_cfg(args, args.stride, args.mode)
    lm = _setup(args)
    tok = lm.tokenizer()
    ids = encode(tok, args.prompt, args.chat)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    out = generate(lm.model, ids, cfg, params)
    text = tok.decode(out.tokens, skip_special_tokens=True)
    s = out.stats
    print(text)
    acc = " ".join(f"{a:.2f}" for a in s.acceptance_at) or "-"
    print(f"[{cfg.mode} N={cfg.stride if cfg.mode == 'isd' else 1}] {s.tokens} tokens, {s.forwards} forwards, "
          f"TPF {s.tpf:.2f}, {s.tokens_per_s:.1f} tok/s, acceptance by draft position {acc}, "
          f"rejects {s.rejects}, cold steps {s.cold_steps}, finish {out.finish_reason}", file=sys.stderr)
    if args.json:
        rec = {"text": text, "tokens": s.tokens, "forwards": s.forwards, "tpf": round(s.tpf, 4),
               "tokens_per_s": round(s.tokens_per_s, 3), "mode": cfg.mode,
               "stride": cfg.stride if cfg.mode == "isd" else 1, "finish_reason": out.finish_reason,
               "model": lm.name, "dtype": args.dtype, "stats": s.to_dict()}
        print(json.dumps(rec))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .eval.bench import run_ours
    from .eval.prompts import BUILTIN_PROMPTS, encode

    if not 1 <= args.prompts <= len(BUILTIN_PROMPTS):
        raise ConfigError(f"--prompts must be in 1..{len(BUILTIN_PROMPTS)}")
    params = _sampling(args)
    cfg = _decode_cfg(args, args.stride)
    lm = _setup(args)
    tok = lm.tokenizer()
    prompts = [encode(tok, p, chat=True) for p in BUILTIN_PROMPTS[: args.prompts]]
    ar = run_ours(lm, prompts, DecodeConfig(mode="ar"), params, "ar")
    isd = run_ours(lm, prompts, cfg, params, f"isd N={cfg.stride}")
    same = 0
    for i, (a, b) in enumerate(zip(ar.outputs, isd.outputs)):
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if a == b:
            same += 1
            print(f"prompt {i}: identical ({len(a)} tokens)")
        else:
            print(f"prompt {i}: DIFFERENT at token {first if first is not None else min(len(a), len(b))}")
    print(f"ISD N={cfg.stride} TPF {isd.tpf:.3f}, dtype {args.dtype}")
    frac = same / len(prompts)
    print(f"{frac:.4g}")
    return 0 if same == len(prompts) else 1


def _strides(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--stride must be an integer or a comma list of integers, got {text!r}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from .eval.bench import run_hf, run_ours
    from .eval.prompts import encode, gsm8k_questions, read_prompt_file

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("ar", "isd", "hf")]
    if bad or not modes:
        raise ConfigError(f"--modes takes a comma list of ar, isd, hf; got {args.modes!r}")
    if args.prompts < 1:
        raise ConfigError("--prompts must be >= 1")
    strides = _strides(args.stride)
    fallbacks = {"on": [True], "off": [False], "both": [False, True]}[args.fallback]
    cfgs = [_decode_cfg(args, n, fallback=f) for n in strides for f in fallbacks]  # validates each stride
    params = _sampling(args, ignore_eos=args.ignore_eos)
    texts = read_prompt_file(args.prompt_file)[: args.prompts] if args.prompt_file else gsm8k_questions(args.prompts)
    lm = _setup(args)
    tok = lm.tokenizer()
    prompts = [encode(tok, t, chat=True) for t in texts]
    results = []
    for m in modes:
        if m == "ar":
            results.append(run_ours(lm, prompts, DecodeConfig(mode="ar"), params, "ar"))
        elif m == "isd":
            results += [run_ours(lm, prompts, c, params, f"isd N={c.stride}{'' if c.fallback else ' no-fb'}")
                        for c in cfgs]
        else:
            results.append(run_hf(lm, prompts, params, DTYPES[args.dtype]))
    ar = next((r for r in results if r.mode == "ar"), None)
    print(f"{len(prompts)} prompts, max {params.max_new_tokens} new tokens, dtype {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'mode':<6}{'N':>3}{'fb':>4}{'tokens':>8}{'forwards':>10}{'TPF':>7}{'tok/s':>9}{'vs ar':>7}  "
          f"{'same as ar':<11} acceptance by draft position")
    for r in results:
        rel = f"{r.tokens_per_s / ar.tokens_per_s:.2f}x" if ar and ar.tokens_per_s else "-"
        same = "-" if not ar or r is ar else f"{sum(a == b for a, b in zip(ar.outputs, r.outputs))}/{len(prompts)}"
        fb = ("on" if r.fallback else "off") if r.mode == "isd" else "-"
        acc = " ".join(f"{a:.2f}" for a in r.acceptance_at()) if r.mode == "isd" else ""
        print(f"{r.mode:<6}{r.stride:>3}{fb:>4}{r.tokens:>8}{r.forwards:>10}{r.tpf:>7.2f}{r.tokens_per_s:>9.1f}"
              f"{rel:>7}  {same:<11} {acc}")
    print(json.dumps({"results": [r.to_json() for r in results]}))
    return 0


DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?"),
]


def cmd_demo(args: argparse.Namespace) -> int:
    from .decode import ar_generate, isd_generate
    from .eval.prompts import encode

    lm = _setup(args)
    tok = lm.tokenizer()
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    cfg = _decode_cfg(args, args.stride)
    print(f"model: {lm.name} ({args.dtype}), ISD stride N={cfg.stride}, greedy, {torch.get_num_threads()} threads")
    if lm.meta is None:
        print("note: this is the base model with no converted I-DLM drafter, so its MASK drafts are rarely "
              "accepted and TPF stays near 1; ISD output is still identical to AR.\n")
    else:
        m = lm.meta
        print(f"drafter: R-ISD gated LoRA (rank {m.lora_rank}, trained {m.steps} steps at block {m.block_size}); "
              f"the anchor is exactly the base model, so ISD output equals the base model's greedy output.\n")
    for text in DEMO_PROMPTS:
        ids = encode(tok, text, chat=True)
        ar = ar_generate(lm.model, ids, params)
        isd = isd_generate(lm.model, ids, cfg, params)
        print(f"Q: {text}")
        print(f"A: {tok.decode(isd.tokens, skip_special_tokens=True).strip()}")
        a, s = ar.stats, isd.stats
        print(f"   ISD: {s.tokens} tokens in {s.forwards} forwards, TPF {s.tpf:.2f}, {s.tokens_per_s:.1f} tok/s | "
              f"AR: TPF 1.00, {a.tokens_per_s:.1f} tok/s | ISD/AR speed {s.tokens_per_s / a.tokens_per_s:.2f}x | "
              f"identical to AR: {'yes' if isd.tokens == ar.tokens else 'NO'}\n")
    return 0


def cmd_forward_cost(args: argparse.Namespace) -> int:
    from .eval.bench import forward_cost

    windows = _strides(args.windows)
    if not windows or min(windows) < 1 or args.prefix < 1 or args.reps < 1:
        raise ConfigError("--windows, --prefix and --reps must be positive")
    lm = _setup(args)
    rows = forward_cost(lm, args.prefix, windows, args.reps)
    print(f"prefix {args.prefix} tokens, dtype {args.dtype}, {torch.get_num_threads()} threads, median of {args.reps}")
    print(f"{'window':>7}{'ms':>9}{'vs 1':>7}")
    for r in rows:
        print(f"{r['window']:>7}{r['ms']:>9.2f}{r['ratio_vs_1']:>7.2f}")
    print(json.dumps({"prefix": args.prefix, "dtype": args.dtype, "results": rows}))
    return 0


def _dataclass_from_args(cls: type, args: argparse.Namespace):
    import dataclasses

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    for k, v in kw.items():
        if isinstance(v, list):
            kw[k] = tuple(v)
    try:
        return cls(**kw)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def cmd_convert(args: argparse.Namespace) -> int:
    from .train.config import ConvertConfig
    from .train.loop import run_convert

    cfg = _dataclass_from_args(ConvertConfig, args)
    res = run_convert(cfg)
    print(json.dumps({"out": str(res.out_dir), "steps": res.steps, "last_loss": round(res.last_loss, 4),
                      "log": str(res.log_path)}))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .train.config import DataGenConfig
    from .train.data import run_data_generate

    cfg = _dataclass_from_args(DataGenConfig, args)
    res = run_data_generate(cfg)
    print(f"{res.out_path}: {res.generated} new records, {res.skipped} already there, {res.response_tokens} tokens")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.nll import response_nll
    from .train.data import LazyTokenizer, load_samples

    if args.limit < 0 or args.max_len < 2:
        raise ConfigError("--limit must be >= 0 and --max-len >= 2")
    rows = []
    for name in args.models:
        args.model = name
        lm = _setup(args)
        try:
            samples = load_samples([args.data], LazyTokenizer(lm))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        samples = samples[: args.limit] if args.limit else samples
        res = response_nll(lm.model, samples, args.max_len, progress=sys.stderr.isatty())
        rows.append({"model": name, **res.to_json()})
    ref = rows[0]["nll"]
    print(f"{'model':<40} {'nll':>8} {'ppl':>8} {'top-1':>6} {'vs first':>9}")
    for r in rows:
        r["nll_vs_first"] = round(r["nll"] / ref - 1, 5) if ref else None
        rel = f"{100 * r['nll_vs_first']:+.2f}%" if ref else "-"
        print(f"{r['model'][-40:]:<40} {r['nll']:8.4f} {r['ppl']:8.3f} {r['top1']:6.3f} {rel:>9}")
    print(f"({rows[0]['tokens']} response tokens in {rows[0]['samples']} samples of {args.data})")
    print(json.dumps({"data": args.data, "results": rows}))
    return 0


COMMANDS = {"eval": cmd_eval, "convert": cmd_convert, "data": cmd_data, "forward-cost": cmd_forward_cost, "generate": cmd_generate, "verify": cmd_verify, "bench": cmd_bench, "demo": cmd_demo}


def dispatch(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)
