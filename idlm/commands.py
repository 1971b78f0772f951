"""One function per CLI subcommand: load the model, tokenize, run, print. Printing lives here;
algorithms live in decode/ and eval/."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .config import QUANT_CHOICES, ConfigError, DecodeConfig, SamplingParams, parse_draft_vocab
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
    vocab = parse_draft_vocab(str(getattr(args, "draft_vocab", "auto")))
    lm = load_model(args.model, dtype=DTYPES[args.dtype], quant=getattr(args, "quant", "none"), draft_vocab=vocab)
    if lm.quant is not None:
        print(f"idlm: {lm.quant.summary()}", file=sys.stderr)
    if lm.rowcheck is not None:
        print(f"idlm: {lm.rowcheck.summary()}", file=sys.stderr)
    if hasattr(args, "quant"):
        args.quant = getattr(lm.model, "quant_mode", "none")  # what auto chose, for the reports
    from .model.native import describe

    args.forward = describe(lm.model)  # for the reports (bench, demo)
    if lm.meta is not None and getattr(lm.meta, "attention", "causal") != "causal" and args.command != "iar":
        print(f"idlm: note: {lm.name} was trained with {lm.meta.attention} attention (a baseline for `idlm iar`); "
              "ISD runs MASK rows causally, so its drafts are off-distribution (the output is still exact)",
              file=sys.stderr)
    return lm


def _sampling(args: argparse.Namespace, **over) -> SamplingParams:
    kw = {"temperature": getattr(args, "temperature", 0.0), "top_p": getattr(args, "top_p", 1.0),
          "top_k": getattr(args, "top_k", 0), "seed": getattr(args, "seed", None),
          "max_new_tokens": args.max_new_tokens}
    kw.update(over)
    return SamplingParams(**kw)


FALLBACKS = {"on": True, "off": False, "auto": "auto"}


def _fallback(text: str) -> bool | str:
    if text not in FALLBACKS:
        raise ConfigError(f"--fallback takes on, off or auto, got {text!r}", "fallback")
    return FALLBACKS[text]


def _decode_cfg(args: argparse.Namespace, stride: int | str, mode: str = "isd",
                fallback: bool | str | None = None, tree: int | None = None) -> DecodeConfig:
    if fallback is None:
        fallback = _fallback(getattr(args, "fallback", "auto"))
    if tree is None:
        tree = getattr(args, "tree", 0)
    return DecodeConfig(mode=mode, stride=stride, pad_windows=getattr(args, "pad_windows", False),
                        sampling_mode=getattr(args, "sampling_mode", "exact"), fallback=fallback,
                        tree=tree if mode == "isd" else 0)


def _engine(lm: LoadedModel, args: argparse.Namespace, max_running: int | None = None):
    from .engine import EngineConfig, LLMEngine

    cfg = EngineConfig(max_running=max_running or getattr(args, "max_running", 16),
                       max_batched_tokens=getattr(args, "max_batched_tokens", 512),
                       kv_cache_gb=getattr(args, "kv_cache_gb", None))
    return LLMEngine(lm.model, cfg)


def _parse_stride(text: str | int) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"--stride must be an integer in 2..8 or 'auto', got {text!r}", "stride") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from .eval.prompts import encode
    from .text import IncrementalDetokenizer

    if not args.prompt.strip():
        raise ConfigError("--prompt is empty")
    params = _sampling(args)
    cfg = _decode_cfg(args, _parse_stride(args.stride), args.mode)
    lm = _setup(args)
    tok = lm.tokenizer()
    ids = encode(tok, args.prompt, args.chat)
    if not ids:
        raise ConfigError("--prompt encodes to no tokens")
    engine = _engine(lm, args, max_running=1)
    rid = engine.add_request(ids, params, cfg)
    detok = IncrementalDetokenizer(tok)
    stream = not args.json
    while engine.has_unfinished():
        for out in engine.step():
            piece = detok.push(out.new_token_ids)
            if stream and piece:
                print(piece, end="", flush=True)
    done = engine.completion(rid)
    text = tok.decode(done.token_ids, skip_special_tokens=True)
    s = done.stats
    if stream:
        print(detok.flush())
    acc = " ".join(f"{a:.2f}" for a in s.acceptance_at) or "-"
    n = cfg.max_stride
    print(f"[{cfg.mode} N={cfg.stride if cfg.mode == 'isd' else 1}] {s.tokens} tokens, {s.forwards} forwards, "
          f"TPF {s.tpf:.2f}, {s.tokens_per_s:.1f} tok/s, acceptance by draft position {acc}, "
          f"rejects {s.rejects}, cold steps {s.cold_steps}, finish {done.finish_reason}", file=sys.stderr)
    if args.json:
        rec = {"text": text, "tokens": s.tokens, "forwards": s.forwards, "tpf": round(s.tpf, 4),
               "tokens_per_s": round(s.tokens_per_s, 3), "mode": cfg.mode,
               "stride": cfg.stride if cfg.mode == "isd" else 1, "max_stride": n,
               "finish_reason": done.finish_reason, "model": lm.name, "dtype": args.dtype, "stats": s.to_dict()}
        print(json.dumps(rec))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .decode import ar_generate
    from .eval.prompts import BUILTIN_PROMPTS, encode

    if not 1 <= args.prompts <= len(BUILTIN_PROMPTS):
        raise ConfigError(f"--prompts must be in 1..{len(BUILTIN_PROMPTS)}")
    params = _sampling(args)
    cfg = _decode_cfg(args, _parse_stride(args.stride))
    lm = _setup(args)
    from .model.native import cpu_description, describe

    print(f"cpu: {cpu_description()}, {torch.get_num_threads()} threads")
    print(f"forward: {describe(lm.model)}; dtype {args.dtype}, quant {args.quant}")
    for r in lm.rowcheck.results if lm.rowcheck is not None else []:
        print(f"  {r.line()}")
    tok = lm.tokenizer()
    prompts = [encode(tok, p, chat=True) for p in BUILTIN_PROMPTS[: args.prompts]]
    engine = _engine(lm, args, max_running=len(prompts))
    isd = engine.generate(prompts, params, cfg, progress=sys.stderr.isatty())  # all in one batch
    same = 0
    for i, (ids, got) in enumerate(zip(prompts, isd)):
        ref = ar_generate(lm.model, ids, params).tokens  # the batch-1 AR decoder, alone
        first = next((k for k, (x, y) in enumerate(zip(ref, got.token_ids)) if x != y), None)
        if ref == got.token_ids:
            same += 1
            print(f"prompt {i}: identical ({len(ref)} tokens)")
        else:
            print(f"prompt {i}: DIFFERENT at token {first if first is not None else min(len(ref), len(got.token_ids))}")
    print(f"engine ISD N={cfg.stride}, {len(prompts)} requests in one batch, TPF {engine.metrics.tpf:.3f}, "
          f"dtype {args.dtype}")
    print(f"{same / len(prompts):.4g}")
    return 0 if same == len(prompts) else 1


def _list(text: str, flag: str, parse=int) -> list:
    try:
        out = [parse(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes a comma list, got {text!r}") from None
    if not out:
        raise ConfigError(f"{flag} is empty")
    return out


def _bench_texts(args: argparse.Namespace) -> list[str]:
    from .eval.prompts import BUILTIN_PROMPTS, gsm8k_questions, read_prompt_file

    if args.prompt_file:
        return read_prompt_file(args.prompt_file)[: args.prompts]
    if args.prompt_set == "builtin":
        return (BUILTIN_PROMPTS * (1 + args.prompts // len(BUILTIN_PROMPTS)))[: args.prompts]
    return gsm8k_questions(args.prompts)


def cmd_bench_http(args: argparse.Namespace) -> int:
    """`idlm bench --server URL`: throughput and latency over HTTP; against an idlm server, side by side
    with the engine's own throughput in the same run (from its /metrics)."""
    import asyncio

    import httpx

    from .eval.http_bench import run_http, server_model

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("ar", "isd") for m in modes):
        raise ConfigError("with --server, --modes takes ar and/or isd")
    concurrency = _list(args.concurrency, "--concurrency")
    stride = str(_parse_stride(args.stride))
    texts = _bench_texts(args)
    key = args.api_key or os.environ.get("IDLM_API_KEY")
    try:
        model = server_model(args.server, key)
    except httpx.HTTPError as e:
        raise ConfigError(f"--server {args.server}: no OpenAI-compatible server answers there ({e})") from None
    rows = []
    for c in concurrency:
        for m in modes:
            rows.append(asyncio.run(run_http(args.server, model, texts, m, stride, c, args.max_new_tokens,
                                             key)).to_json())
    print(f"server {args.server} (model {model}), {len(texts)} prompts, max {args.max_new_tokens} tokens, greedy, "
          f"stride {stride}")
    print(f"{'mode':<5}{'C':>4}{'req/s':>8}{'tok/s':>9}{'TTFT p50':>10}{'p99':>8}{'ITL p50':>9}{'p99':>8}"
          f"{'engine':>9}{'http/eng':>9}{'err':>5}")
    for r in rows:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        print(f"{r['mode']:<5}{r['concurrency']:>4}{r['requests_per_s']:>8.2f}{r['output_tokens_per_s']:>9.1f}"
              f"{f(r['ttft_p50_s'], '.3f'):>10}{f(r['ttft_p99_s'], '.3f'):>8}{f(r['itl_p50_s'], '.4f'):>9}"
              f"{f(r['itl_p99_s'], '.4f'):>8}{f(r.get('engine_tokens_per_s'), '.1f'):>9}"
              f"{f(r.get('http_vs_engine'), '.3f'):>9}{r['errors']:>5}")
    print(json.dumps({"server": args.server, "model": model, "prompts": len(texts),
                      "max_new_tokens": args.max_new_tokens, "results": rows}))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .eval.bench import (
        LLAMACPP_HINT,
        MODES,
        llamacpp_available,
        run_batch1,
        run_engine,
        run_hf,
        run_llamacpp,
    )
    from .eval.prompts import encode

    if args.server:
        return cmd_bench_http(args)

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"--modes takes a comma list of {', '.join(MODES)}; got {args.modes!r}")
    if args.prompts < 1 or args.repeats < 1:
        raise ConfigError("--prompts and --repeats must be >= 1")
    strides = _list(args.stride, "--stride", _parse_stride)
    concurrency = _list(args.concurrency, "--concurrency")
    if min(concurrency) < 1:
        raise ConfigError("--concurrency values must be >= 1")
    fallbacks = [_fallback(f) for f in _list(args.fallback, "--fallback", str)]
    trees = _list(args.tree, "--tree")
    cfgs = [_decode_cfg(args, n, fallback=f, tree=k) for n in strides for f in fallbacks
            for k in trees]  # validates each
    if "llamacpp" in modes and not llamacpp_available():
        raise ConfigError(LLAMACPP_HINT)
    if "isd-b1" in modes and all(c.auto for c in cfgs):
        raise ConfigError("isd-b1 (the batch-1 decoder) needs a fixed --stride; auto is the engine's (mode isd)")
    params = _sampling(args, ignore_eos=args.ignore_eos)
    texts, gsm = _bench_texts(args), None
    if not args.prompt_file and args.prompt_set == "gsm8k":  # score the outputs: a fixed GSM8K slice
        from .eval.tasks import GSM8K

        task = GSM8K()
        gsm = task.examples(args.prompts)
        texts = [e.prompt for e in gsm]
    if "llamacpp" in modes and not params.greedy:
        raise ConfigError("--modes llamacpp runs greedy decoding only (--temperature 0)")
    lm = _setup(args)
    gguf = None
    if "llamacpp" in modes:
        from .model.loading import gguf_source

        gguf = gguf_source(lm.folder)
        if gguf is None:
            raise ConfigError(f"--modes llamacpp runs llama.cpp on the model's GGUF file; {lm.name} was not loaded "
                              "from a GGUF (use the default model, or --model FILE.gguf)")
    tok = lm.tokenizer()
    prompts = [encode(tok, t, chat=True) for t in texts]
    cost = None
    if any(c.adaptive for c in cfgs) and "isd" in modes:
        from .engine import CostModel

        cost = CostModel.for_model(lm.model)
    from .engine import EngineConfig

    ecfg = EngineConfig(max_batched_tokens=args.max_batched_tokens, kv_cache_gb=args.kv_cache_gb)
    oracle = run_batch1(lm, prompts, DecodeConfig(mode="ar", sampling_mode=cfgs[0].sampling_mode), params,
                        desc="oracle: batch-1 AR")
    runs = []  # (label, thunk): every configuration, run `--repeats` times round-robin
    for c in concurrency:
        for m in modes:
            if m == "ar":
                runs.append(lambda c=c: run_engine(lm, prompts, DecodeConfig(mode="ar"), params, c, ecfg, cost, f"ar C={c}"))
            elif m == "isd":
                runs += [lambda c=c, d=d: run_engine(lm, prompts, d, params, c, ecfg, cost, f"isd N={d.stride} C={c}")
                         for d in cfgs]
            elif c == concurrency[0]:  # one-at-a-time references: once per repeat
                if m == "ar-b1":
                    runs.append(lambda: run_batch1(lm, prompts, DecodeConfig(mode="ar"), params, "ar-b1"))
                elif m == "isd-b1":
                    runs += [lambda d=d: run_batch1(lm, prompts, d, params, f"isd-b1 N={d.stride}")
                             for d in cfgs if not d.auto]
                elif m == "llamacpp":
                    runs.append(lambda: run_llamacpp(gguf, prompts, params, lm.model.cfg.eos_token_ids,
                                                     torch.get_num_threads()))
                else:
                    runs.append(lambda: run_hf(lm, prompts, params, DTYPES[args.dtype]))
    trials = [[] for _ in runs]
    for _ in range(args.repeats):
        for k, run in enumerate(runs):
            trials[k].append(run())
    results = [sorted(t, key=lambda r: r.total_tokens_per_s)[len(t) // 2] for t in trials]  # the median run
    for r in results:
        r.identical = round(sum(a == b for a, b in zip(oracle.outputs, r.outputs)) / len(prompts), 4)
        if gsm is not None:
            sc = [task.score(e, tok.decode(o, skip_special_tokens=True)).values for e, o in zip(gsm, r.outputs)]
            r.quality = {k: sum(v[k] for v in sc) / len(sc) for k in sc[0]}
    _print_bench(results, prompts, params, args)
    rows = [r.to_json() for r in results]
    if args.plots:
        from .eval.plots import write_bench_plots

        paths = write_bench_plots(rows, args.plots, f"{lm.name}, {len(prompts)} prompts, {args.dtype}, quant {args.quant}")
        print("plots: " + ", ".join(str(p) for p in paths))
    print(json.dumps({"prompts": len(prompts), "max_new_tokens": params.max_new_tokens, "dtype": args.dtype,
                      "quant": args.quant, "forward": args.forward.split(" ")[0],
                      "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "results": rows}))
    return 0


def _print_bench(results, prompts, params, args) -> None:
    print(f"{len(prompts)} prompts, max {params.max_new_tokens} new tokens, dtype {args.dtype}, quant {args.quant}, "
          f"{args.forward.split(' ')[0]} forward, {torch.get_num_threads()} threads, median of {args.repeats} round-robin run(s); "
          f"'vs AR' = total tok/s / engine AR at the same concurrency")
    print(f"{'mode':<7}{'N':>5}{'fb':>5}{'tree':>5}{'C':>4}{'tokens':>8}{'TPF':>6}{'total/s':>9}{'req/s':>8}{'p50 s':>7}"
          f"{'p90 s':>7}{'vs AR':>7}{'same':>6}{'ovh':>6}{'gsm8k':>7}  acceptance / auto N")
    ar = {r.concurrency: r for r in results if r.mode == "ar"}
    for r in results:
        base = ar.get(r.concurrency)
        rel = f"{r.total_tokens_per_s / base.total_tokens_per_s:.2f}x" if base and base.total_tokens_per_s else "-"
        fb = {True: "on", False: "off", "auto": "auto"}[r.fallback] if r.mode.startswith("isd") else "-"
        ovh = f"{r.overhead_ratio:.2f}" if r.overhead_ratio is not None else "-"
        qual = f"{r.quality['strict']:.3f}" if r.quality else "-"
        extra = " ".join(f"{a:.2f}" for a in r.acceptance_at()) if r.mode.startswith("isd") else ""
        if r.strides_chosen:
            extra += "  chose " + ", ".join(f"{k}:{v}" for k, v in sorted(r.strides_chosen.items()))
        tree = str(r.tree) if r.mode.startswith("isd") else "-"
        print(f"{r.mode:<7}{r.stride!s:>5}{fb:>5}{tree:>5}{r.concurrency:>4}{r.tokens:>8}{r.tpf:>6.2f}"
              f"{r.total_tokens_per_s:>9.1f}{r.per_request_tokens_per_s:>8.1f}{r.latency(0.5):>7.2f}"
              f"{r.latency(0.9):>7.2f}{rel:>7}{r.identical!s:>6}{ovh:>6}{qual:>7}  {extra}")


DEMO_PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?"),
]


def cmd_demo(args: argparse.Namespace) -> int:
    from .decode import ar_generate
    from .eval.prompts import encode

    lm = _setup(args)
    tok = lm.tokenizer()
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    cfg = _decode_cfg(args, args.stride)
    print(f"model: {lm.name} ({args.dtype}, quant {args.quant}, {args.forward.split(' ')[0]} forward), "
          f"ISD stride N={cfg.stride}, greedy, "
          f"{torch.get_num_threads()} threads")
    if lm.meta is None:
        print("note: this is the base model with no converted I-DLM drafter, so its MASK drafts are rarely "
              "accepted and TPF stays near 1; ISD output is still identical to AR.\n")
    else:
        m = lm.meta
        print(f"drafter: R-ISD gated LoRA (rank {m.lora_rank}, trained {m.steps} steps at block {m.block_size}); "
              f"the anchor is exactly the base model, so ISD output equals the base model's greedy output.\n")
    engine = _engine(lm, args, max_running=1)
    engine.generate([encode(tok, DEMO_PROMPTS[0], chat=True)[:16]], SamplingParams(max_new_tokens=4), cfg)  # warm-up
    for text in DEMO_PROMPTS:
        ids = encode(tok, text, chat=True)
        isd = engine.generate([ids], params, cfg)[0]
        ar = engine.generate([ids], params, DecodeConfig(mode="ar"))[0]
        same = isd.token_ids == ar.token_ids == ar_generate(lm.model, ids, params).tokens
        print(f"Q: {text}")
        print(f"A: {tok.decode(isd.token_ids, skip_special_tokens=True).strip()}")
        a, s = ar.stats, isd.stats
        print(f"   ISD: {s.tokens} tokens in {s.forwards} forwards, TPF {s.tpf:.2f}, {s.tokens_per_s:.1f} tok/s | "
              f"AR: TPF 1.00, {a.tokens_per_s:.1f} tok/s | ISD/AR speed {s.tokens_per_s / a.tokens_per_s:.2f}x | "
              f"identical to AR: {'yes' if same else 'NO'}\n")
    return 0


def cmd_forward_cost(args: argparse.Namespace) -> int:
    from .eval.bench import forward_cost

    windows = _list(args.windows, "--windows")
    if not windows or min(windows) < 1 or args.prefix < 1 or args.reps < 1:
        raise ConfigError("--windows, --prefix and --reps must be positive")
    lm = _setup(args)
    rows = forward_cost(lm, args.prefix, windows, args.reps)
    print(f"prefix {args.prefix} tokens, dtype {args.dtype}, quant {args.quant}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}")
    isd = "isd_ms" in rows[0]
    print(f"{'window':>7}{'ms':>9}{'vs 1':>7}" + (f"{'as ISD ms':>11}{'drafter':>9}" if isd else ""))
    for r in rows:
        print(f"{r['window']:>7}{r['ms']:>9.2f}{r['ratio_vs_1']:>7.2f}"
              + (f"{r['isd_ms']:>11.2f}{r['drafter_share']:>9.0%}" if isd else ""))
    if isd:
        print("as ISD: the last w // 2 rows are MASK rows (adapter on, draft vocabulary); drafter = its share")
    print(json.dumps({"prefix": args.prefix, "dtype": args.dtype, "quant": args.quant, "results": rows}))
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
    if res.is_main:
        print(json.dumps({"out": str(res.out_dir), "steps": res.steps, "last_loss": round(res.last_loss, 4),
                          "log": str(res.log_path)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train.engines import ExportError, export_for

    try:
        res = export_for(args.to, args.model, args.out, stride=args.stride, mask_id=args.mask_id,
                         temperature=args.temperature)
    except ExportError as e:
        raise ConfigError(str(e)) from None
    print(f"wrote {res.out}: {', '.join(res.files)}")
    for note in res.notes:
        print(f"  note: {note}")
    print(f"launch:\n  {res.command}")
    print(json.dumps({"to": res.target, "out": str(res.out), "command": res.command}))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "prompts":
        return _data_prompts(args)
    if args.data_command == "vocab":
        return _data_vocab(args)
    from .train.config import DataGenConfig
    from .train.data import run_data_generate

    cfg = _dataclass_from_args(DataGenConfig, args)
    res = run_data_generate(cfg)
    print(f"{res.out_path}: {res.generated} new records, {res.skipped} already there, {res.response_tokens} tokens")
    return 0


def _data_vocab(args: argparse.Namespace) -> int:
    from .model.draftvocab import count_tokens, write_ranking
    from .train.data import LazyTokenizer, load_samples

    if args.default_k < 1:
        raise ConfigError("--default-k must be >= 1", "default_k")
    from types import SimpleNamespace

    from .model.loading import DEFAULT_MODEL, resolve_folder

    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(resolve_folder(args.model or DEFAULT_MODEL)))

    samples = load_samples(args.data, LazyTokenizer(SimpleNamespace(tokenizer=tokenizer)))
    counts = count_tokens(s.response_ids for s in samples)
    from .model.loading import read_config

    vocab = int(read_config(resolve_folder(args.model or DEFAULT_MODEL)).get("vocab_size", 0))
    meta = write_ranking(Path(args.out), counts, args.default_k, [str(Path(p).name) for p in args.data], vocab)
    print(f"{args.out}: {meta['distinct']} distinct tokens of {meta['tokens_counted']} in {len(samples)} responses; "
          f"the {meta['default_k']} most frequent cover {meta['coverage_at_default_k']:.2%}")
    return 0


def _data_prompts(args: argparse.Namespace) -> int:
    from .train.magpie import synthesize_prompts

    if args.count < 1 or args.batch_size < 1 or args.max_tokens < 1:
        raise ConfigError("--count, --batch-size and --max-tokens must be >= 1")
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise ConfigError("--temperature must be > 0 and --top-p in (0, 1]")
    res = synthesize_prompts(args.out, args.count, args.model, args.seed, args.batch_size, args.max_tokens,
                             args.temperature, args.top_p, args.progress)
    print(f"{res.out_path}: {res.written} new prompts ({res.sampled} sampled), {res.total} in the file")
    if res.exhausted:
        print(f"idlm: warning: stopped after {res.sampled} samples with {res.total} of {args.count} prompts: the "
              "model rarely ends a user turn (try a lower --temperature or a larger --max-tokens)", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.limit < 0 or args.concurrency < 1:
        raise ConfigError("--limit must be >= 0 and --concurrency >= 1")
    if args.task == "nll":
        return _eval_nll(args)
    return _eval_generate(args)


def _eval_nll(args: argparse.Namespace) -> int:
    from .eval.nll import response_nll
    from .train.data import LazyTokenizer, load_samples

    if args.data is None:
        raise ConfigError("--task nll needs --data FILE (held-out samples, e.g. `idlm data generate` output)")
    if args.max_len < 2:
        raise ConfigError("--max-len must be >= 2")
    if args.server:
        raise ConfigError("--task nll scores in process; --server is for gsm8k and humaneval")
    if not Path(args.data).is_file():  # before loading any model: a typo should cost no load time
        raise ConfigError(f"--data {args.data}: no such file")
    args.dtype = args.dtype or "fp32"
    # nll measures quality: the dense weights unless a quantization is asked for (auto would make a GGUF base
    # int4 and a converted safetensors model dense, an unequal comparison)
    quants = _list(args.quants, "--quants", str) if args.quants else ["none" if args.quant == "auto" else args.quant]
    bad = [q for q in quants if q not in QUANT_CHOICES]
    if bad:
        raise ConfigError(f"--quants takes a comma list of {', '.join(QUANT_CHOICES)}; got {args.quants!r}")
    rows = []
    for name in args.models or [args.model or "default"]:
        samples = None  # tokenized once per model: every quantization of it shares the tokenizer
        for quant in quants:
            args.model, args.quant = (None if name == "default" else name), quant
            lm = _setup(args)
            if samples is None:
                try:
                    samples = load_samples([args.data], LazyTokenizer(lm), evaluation=True)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
                samples = samples[: args.limit] if args.limit else samples
            res = response_nll(lm.model, samples, args.max_len, progress=sys.stderr.isatty())
            label = f"{name} [{args.dtype}, {args.quant}]"
            rows.append({"model": label, "dtype": args.dtype, "quant": args.quant, **res.to_json()})
    ref = rows[0]["nll"]
    out = sys.stderr if args.json else sys.stdout
    print(f"{'model':<40} {'nll':>8} {'ppl':>8} {'top-1':>6} {'vs first':>9}", file=out)
    for r in rows:
        r["nll_vs_first"] = round(r["nll"] / ref - 1, 5) if ref else None
        rel = f"{100 * r['nll_vs_first']:+.2f}%" if ref else "-"
        print(f"{r['model'][-40:]:<40} {r['nll']:8.4f} {r['ppl']:8.3f} {r['top1']:6.3f} {rel:>9}", file=out)
    print(f"({rows[0]['tokens']} response tokens in {rows[0]['samples']} samples of {args.data})", file=out)
    print(json.dumps({"task": "nll", "data": args.data, "score": rows[0]["nll"], "metric": "nll",
                      "n": rows[0]["samples"], "results": rows}))
    return 0


def _eval_generate(args: argparse.Namespace) -> int:
    from .eval.evaluate import EvalResult, compare, score_all
    from .eval.runner import generate_engine, generate_server
    from .eval.tasks import get_task

    if args.models:
        raise ConfigError("--models is for --task nll; use --model")
    stride = _parse_stride(args.stride)
    cfg = _decode_cfg(args, stride, args.mode)  # validates --stride
    try:
        if not args.timeout > 0:
            raise ConfigError("--timeout must be > 0")
        kw = {"timeout_s": args.timeout, "style": args.prompt_style or "chat"} if args.task == "humaneval" else {}
        if args.prompt_style == "completion" and args.task == "gsm8k":
            raise ConfigError("--prompt-style completion is for humaneval; gsm8k asks as a chat")
        task = get_task(args.task, args.data, **kw)
        examples = task.examples(args.limit)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    max_new = args.max_new_tokens or task.max_new_tokens
    params = SamplingParams(max_new_tokens=max_new)  # greedy
    modes = [args.mode] + (["ar"] if args.compare == "ar" and args.mode != "ar" else [])
    progress = sys.stderr.isatty()
    runs = {}
    if args.server:
        import httpx

        from .eval.http_bench import server_model

        key = args.api_key or os.environ.get("IDLM_API_KEY")
        try:
            model = server_model(args.server, key)
        except httpx.HTTPError as e:
            raise ConfigError(f"--server {args.server}: no OpenAI-compatible server answers there ({e})") from None
        for m in modes:
            runs[m] = generate_server(args.server, model, examples, task.chat, task.stop, max_new, m,
                                      cfg.stride, args.concurrency, key, progress, f"{args.task} {m}")
        where, name = args.server, model
    else:
        args.dtype = args.dtype or "bf16"
        lm = _setup(args)
        engine = _engine(lm, args, max_running=args.concurrency)
        tok = lm.tokenizer()
        for m in modes:
            d = cfg if m == args.mode else DecodeConfig(mode="ar")
            runs[m] = generate_engine(engine, tok, examples, task.chat, task.stop, params, d, args.concurrency,
                                      progress, f"{args.task} {m}")
        where, name = "engine", lm.name
    results = {}
    for m, run in runs.items():
        res = EvalResult(args.task, m, cfg.stride, examples, run, score_all(task, examples, run),
                         args.concurrency, where)
        default = f"idlm-eval/{args.task}-{m}.jsonl"
        path = (args.records if m == args.mode else _sibling(args.records, "ar")) if args.records else default
        results[m] = (res, res.write(path))
    out = sys.stderr if args.json else sys.stdout
    print(f"{args.task}: {len(examples)} examples, model {name}, {where}, greedy, max {max_new} new tokens, "
          f"concurrency {args.concurrency}" + ("" if args.server else f", dtype {args.dtype}"), file=out)
    print(f"{'mode':<5}{'N':>5}{'score':>8}  {'scores':<28}{'tok/s':>8}{'TPF':>7}{'tokens':>8}{'s':>8}{'err':>5}"
          "  records", file=out)
    for m, (res, path) in results.items():
        s = res.summary()
        sc = " ".join(f"{k} {v:.3f}" for k, v in s["scores"].items())
        tpf = f"{s['tpf']:.2f}" if s["tpf"] is not None else "-"
        print(f"{m:<5}{s['stride']!s:>5}{s['score']:>8.4f}  {sc:<28}{s['tokens_per_s']:>8.1f}{tpf:>7}"
              f"{s['tokens']:>8}{s['seconds']:>8.1f}{s['errors']:>5}  {path}", file=out)
    main, main_path = results[args.mode]
    summary = {**main.summary(), "model": name, "records": str(main_path)}
    status = 0
    if len(results) > 1:
        ar, ar_path = results["ar"]
        cmp = compare(main, ar)
        summary["compare"] = {"mode": "ar", **{k: v for k, v in ar.summary().items() if k != "task"},
                              "records": str(ar_path), **cmp}
        print(f"ISD vs AR: {100 * cmp['identical']:.1f}% of outputs identical, speed ratio {cmp['speed_ratio']}"
              + (f"; differing: {', '.join(cmp['differing_ids'])}" if cmp["differing_ids"] else ""), file=out)
        status = 0 if cmp["identical"] == 1.0 else 1
    print(json.dumps(summary))
    return status


def _sibling(path: str, suffix: str) -> str:
    """records.jsonl -> records-ar.jsonl"""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{suffix}{p.suffix}"))


def cmd_iar(args: argparse.Namespace) -> int:
    from .eval.iar import measure_iar
    from .eval.prompts import BUILTIN_PROMPTS, encode, gsm8k_questions

    if args.prompts < 1 or args.max_new_tokens < 1 or args.temperature < 0:
        raise ConfigError("--prompts and --max-new-tokens must be >= 1, --temperature >= 0")
    if args.block is not None and not 0 <= args.block <= 15:
        raise ConfigError("--block must be in 0..15")
    if args.prompt_set == "builtin":
        texts = (BUILTIN_PROMPTS * (1 + args.prompts // len(BUILTIN_PROMPTS)))[: args.prompts]
    else:
        texts = gsm8k_questions(args.prompts)
    steps_list = _list(args.steps, "--steps")
    rows = []
    for name in args.models or [args.model]:
        args.model = None if name == "default" else name
        lm = _setup(args)
        meta = lm.meta
        block = args.block if args.block is not None else (meta.block_size if meta else 2)
        if not all(1 <= s <= block + 1 for s in steps_list):
            raise ConfigError(f"--steps must be in 1..{block + 1} (block {block} + the anchor token)")
        attention = args.attention or (getattr(meta, "attention", "causal") if meta else "causal")
        tok = lm.tokenizer()
        prompts = [encode(tok, t, chat=True) for t in texts]
        for steps in steps_list:
            res = measure_iar(lm.model, prompts, block, args.max_new_tokens, attention,
                              tuple(lm.model.cfg.eos_token_ids), args.temperature, args.seed,
                              progress=sys.stderr.isatty(), steps=steps)
            rows.append({"model": lm.name if name in (None, "default") else name, **res.to_json()})
    out = sys.stderr if args.json else sys.stdout
    print(f"{len(texts)} {args.prompt_set} prompts, max {args.max_new_tokens} tokens, "
          f"{'greedy' if args.temperature == 0 else f'T={args.temperature:g}'} drafts, dtype {args.dtype}", file=out)
    print(f"{'model':<36}{'attention':>20}{'B':>3}{'steps':>6}{'IAR':>8}{'drafts':>8}  per position (0 = anchor)"
          "   greedy agreement", file=out)
    for r in rows:
        per = " ".join("-" if v is None else f"{v:.3f}" for v in r["iar_per_position"])
        agree = " ".join("-" if v is None else f"{v:.3f}" for v in r["greedy_agreement_per_position"])
        d = "-" if r["draft_iar"] is None else f"{r['draft_iar']:.4f}"
        print(f"{str(r['model'])[-36:]:<36}{r['attention']:>20}{r['block']:>3}{r['steps']:>6}{r['iar']:>8.4f}{d:>8}"
              f"  {per:<26}{agree}", file=out)
    print(json.dumps({"prompts": len(texts), "prompt_set": args.prompt_set, "max_new_tokens": args.max_new_tokens,
                      "temperature": args.temperature, "dtype": args.dtype, "results": rows}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import ServerConfig
    from .server.serve import serve

    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServerConfig)}
    kw["stride"] = _parse_stride(kw["stride"])
    return serve(ServerConfig(**kw))


COMMANDS = {"iar": cmd_iar, "serve": cmd_serve, "eval": cmd_eval, "convert": cmd_convert, "data": cmd_data, "export": cmd_export, "forward-cost": cmd_forward_cost, "generate": cmd_generate, "verify": cmd_verify, "bench": cmd_bench, "demo": cmd_demo}


def dispatch(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)
