"""`idlm bench` (in process, or a server over HTTP) and `idlm forward-cost`: speed, side by side in one run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, DecodeConfig, EngineConfig, ModelOptions, opt
from ..model import DTYPES
from .common import load, parse_fallback, parse_list, parse_stride, short_forward


@dataclass(frozen=True)
class BenchArgs:
    """Serve the same prompts through the engine with at most C requests in flight, for each mode, stride and
    concurrency; print a table, then one JSON line {"results": [...]} with total and per-request tok/s, TPF,
    latency p50/p90 and 'identical' (the fraction of outputs equal to the batch-1 AR decoder's) and, on the
    default prompts (the first K GSM8K test questions as chat prompts), the GSM8K accuracy of each run's outputs;
    PNG plots go to --plots."""

    modes: str = "ar,isd"  # comma list of ar, isd (the engine), ar-b1, isd-b1 (the batch-1 decoders, one request
    #   at a time), hf (transformers generate) and llamacpp (llama.cpp through llama-cpp-python on the same GGUF and
    #   prompt ids, greedy: pip install '.[compare]')
    stride: str = "3"  # ISD stride, or a comma list such as 2,3,auto; auto = the engine picks N each step
    concurrency: str = "1"  # requests in flight, or a comma list such as 1,4,8,16; each value is a separate run
    prompt_set: str = opt("gsm8k", choices=("gsm8k", "builtin"))  # default prompts: GSM8K test questions, or 16
    #   varied chat requests
    prompts: int = 4  # number of prompts
    prompt_file: str | None = None  # prompts file (one per line or JSONL with 'prompt')
    max_new_tokens: int = 256  # tokens per prompt
    ignore_eos: bool = False  # always generate --max-new-tokens tokens
    repeats: int = 1  # run every configuration this many times, round-robin, and report the median run (3 evens
    #   out a noisy machine)
    pad_windows: bool = False  # pad windows to their largest size
    plots: str = opt("idlm-bench", metavar="DIR")  # write PNG plots here: throughput vs concurrency, acceptance per
    #   draft position, TPF vs stride ('' = none)
    fallback: str = "auto"  # fallback drafts (see generate --help), or a comma list such as auto,on,off
    tree: str = "0"  # draft-tree branches per window (see generate --help), or a comma list such as 0,2
    json: bool = False  # (the JSON line is always printed last)
    server: str | None = opt(None, metavar="URL")  # bench a running OpenAI-compatible server over HTTP instead (e.g.
    #   http://127.0.0.1:8000): streaming chat requests, C in flight; requests/s, output tok/s, TTFT and inter-token
    #   latency p50/p99 for each mode (isd / ar); against idlm also the engine's own tok/s in the same run (tokens /
    #   time in engine steps) and their ratio
    api_key: str | None = None  # with --server: the server's key (default $IDLM_API_KEY)
    engine: EngineConfig = field(default_factory=EngineConfig)
    load: ModelOptions = field(default_factory=ModelOptions)


def _texts(a: BenchArgs) -> list[str]:
    from ..eval.prompts import BUILTIN_PROMPTS, gsm8k_questions, read_prompt_file

    if a.prompt_file:
        return read_prompt_file(a.prompt_file)[: a.prompts]
    if a.prompt_set == "builtin":
        return (BUILTIN_PROMPTS * (1 + a.prompts // len(BUILTIN_PROMPTS)))[: a.prompts]
    return gsm8k_questions(a.prompts)


def _decodes(a: BenchArgs) -> tuple[DecodeConfig, ...]:
    strides = parse_list(a.stride, "--stride", parse_stride)
    fallbacks = [parse_fallback(f) for f in parse_list(a.fallback, "--fallback", str)]
    trees = parse_list(a.tree, "--tree")
    return tuple(DecodeConfig(stride=n, pad_windows=a.pad_windows, fallback=f, tree=k)
                 for n in strides for f in fallbacks for k in trees)  # validates each


def _check(a: BenchArgs, modes: list[str], decodes: tuple[DecodeConfig, ...], concurrency: list[int]) -> None:
    from ..eval.bench import LLAMACPP_HINT, MODES, llamacpp_available

    if not modes or any(m not in MODES for m in modes):
        raise ConfigError(f"--modes takes a comma list of {', '.join(MODES)}; got {a.modes!r}")
    if a.prompts < 1 or a.repeats < 1:
        raise ConfigError("--prompts and --repeats must be >= 1")
    if min(concurrency) < 1:
        raise ConfigError("--concurrency values must be >= 1")
    if "llamacpp" in modes and not llamacpp_available():
        raise ConfigError(LLAMACPP_HINT)
    if "isd-b1" in modes and all(d.auto for d in decodes):
        raise ConfigError("isd-b1 (the batch-1 decoder) needs a fixed --stride; auto is the engine's (mode isd)")


def cmd_bench(a: BenchArgs) -> int:
    from ..eval.bench import BenchPlan, run_plan, score_outputs
    from ..eval.prompts import encode
    from ..model.loading import gguf_source

    if a.server:
        return cmd_bench_http(a)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    decodes, concurrency = _decodes(a), parse_list(a.concurrency, "--concurrency")
    _check(a, modes, decodes, concurrency)
    texts, task, examples = _texts(a), None, None
    if not a.prompt_file and a.prompt_set == "gsm8k":  # score the outputs: a fixed GSM8K slice
        from ..eval.tasks import GSM8K

        task = GSM8K()
        examples = task.examples(a.prompts)
        texts = [e.prompt for e in examples]
    lm = load(a.load)
    gguf = gguf_source(lm.folder) if "llamacpp" in modes else None
    if "llamacpp" in modes and gguf is None:
        raise ConfigError(f"--modes llamacpp runs llama.cpp on the model's GGUF file; {lm.name} was not loaded "
                          "from a GGUF (use the default model, or --model FILE.gguf)")
    tok = lm.tokenizer()
    prompts = [encode(tok, t, chat=True) for t in texts]
    plan = BenchPlan(tuple(modes), decodes, tuple(concurrency), _params(a), a.engine, a.repeats, gguf,
                     DTYPES[lm.dtype_name])
    results = run_plan(lm, prompts, plan)
    if task is not None:
        score_outputs(results, task, examples, tok)
    _print_table(results, prompts, plan, lm)
    rows = [r.to_json() for r in results]
    if a.plots:
        from ..eval.plots import write_bench_plots

        paths = write_bench_plots(rows, a.plots, f"{lm.name}, {len(prompts)} prompts, {lm.dtype_name}, "
                                                 f"quant {lm.quant_mode}")
        print("plots: " + ", ".join(str(p) for p in paths))
    print(json.dumps({"prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "dtype": lm.dtype_name,
                      "quant": lm.quant_mode, "forward": short_forward(lm), "repeats": a.repeats,
                      "threads": torch.get_num_threads(), "results": rows}))
    return 0


def _params(a: BenchArgs):
    from ..config import SamplingParams

    return SamplingParams(max_new_tokens=a.max_new_tokens, ignore_eos=a.ignore_eos)


def _print_table(results, prompts, plan, lm) -> None:
    print(f"{len(prompts)} prompts, max {plan.params.max_new_tokens} new tokens, dtype {lm.dtype_name}, quant "
          f"{lm.quant_mode}, {short_forward(lm)} forward, {torch.get_num_threads()} threads, median of "
          f"{plan.repeats} round-robin run(s); 'vs AR' = total tok/s / engine AR at the same concurrency")
    print(f"{'mode':<7}{'N':>5}{'fb':>5}{'tree':>5}{'C':>4}{'tokens':>8}{'TPF':>6}{'total/s':>9}{'req/s':>8}{'p50 s':>7}"
          f"{'p90 s':>7}{'vs AR':>7}{'same':>6}{'ovh':>6}{'gsm8k':>7}  acceptance / auto N")
    ar = {r.concurrency: r for r in results if r.mode == "ar"}
    for r in results:
        base = ar.get(r.concurrency)
        rel = f"{r.total_tokens_per_s / base.total_tokens_per_s:.2f}x" if base and base.total_tokens_per_s else "-"
        isd = r.mode.startswith("isd")
        fb = {True: "on", False: "off", "auto": "auto"}[r.fallback] if isd else "-"
        ovh = f"{r.overhead_ratio:.2f}" if r.overhead_ratio is not None else "-"
        qual = f"{r.quality['strict']:.3f}" if r.quality else "-"
        extra = " ".join(f"{x:.2f}" for x in r.acceptance_at()) if isd else ""
        if r.strides_chosen:
            extra += "  chose " + ", ".join(f"{k}:{v}" for k, v in sorted(r.strides_chosen.items()))
        print(f"{r.mode:<7}{r.stride!s:>5}{fb:>5}{str(r.tree) if isd else '-':>5}{r.concurrency:>4}{r.tokens:>8}"
              f"{r.tpf:>6.2f}{r.total_tokens_per_s:>9.1f}{r.per_request_tokens_per_s:>8.1f}{r.latency(0.5):>7.2f}"
              f"{r.latency(0.9):>7.2f}{rel:>7}{r.identical!s:>6}{ovh:>6}{qual:>7}  {extra}")


def cmd_bench_http(a: BenchArgs) -> int:
    """`idlm bench --server URL`: throughput and latency over HTTP; against an idlm server, side by side
    with the engine's own throughput in the same run (from its /metrics)."""
    import asyncio

    from ..eval.http_bench import run_http

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or any(m not in ("ar", "isd") for m in modes):
        raise ConfigError("with --server, --modes takes ar and/or isd")
    concurrency = parse_list(a.concurrency, "--concurrency")
    stride = str(parse_stride(a.stride))
    texts = _texts(a)
    key = a.api_key or os.environ.get("IDLM_API_KEY")
    model = server_model_or_error(a.server, key)
    rows = [asyncio.run(run_http(a.server, model, texts, m, stride, c, a.max_new_tokens, key)).to_json()
            for c in concurrency for m in modes]
    print(f"server {a.server} (model {model}), {len(texts)} prompts, max {a.max_new_tokens} tokens, greedy, "
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
    print(json.dumps({"server": a.server, "model": model, "prompts": len(texts),
                      "max_new_tokens": a.max_new_tokens, "results": rows}))
    return 0


def server_model_or_error(url: str, key: str | None) -> str:
    """The model id a server lists, or one error line if nothing OpenAI-compatible answers at ``url``."""
    import httpx

    from ..eval.http_bench import server_model

    try:
        return server_model(url, key)
    except httpx.HTTPError as e:
        raise ConfigError(f"--server {url}: no OpenAI-compatible server answers there ({e})") from None


@dataclass(frozen=True)
class ForwardCostArgs:
    """Median time of one forward that appends a window of k tokens to a cached prefix, for several k,
    measured interleaved; ratios are vs k = 1. Ends with one JSON line."""

    prefix: int = 512  # cached prefix length
    windows: str = "1,2,3,4,5,7"  # comma list of window sizes
    reps: int = 20  # timed repetitions per window
    load: ModelOptions = field(default_factory=ModelOptions)


def cmd_forward_cost(a: ForwardCostArgs) -> int:
    from ..eval.bench import forward_cost

    windows = parse_list(a.windows, "--windows")
    if min(windows) < 1 or a.prefix < 1 or a.reps < 1:
        raise ConfigError("--windows, --prefix and --reps must be positive")
    lm = load(a.load)
    rows = forward_cost(lm, a.prefix, windows, a.reps)
    print(f"prefix {a.prefix} tokens, dtype {lm.dtype_name}, quant {lm.quant_mode}, {torch.get_num_threads()} "
          f"threads, median of {a.reps}")
    isd = "isd_ms" in rows[0]
    print(f"{'window':>7}{'ms':>9}{'vs 1':>7}" + (f"{'as ISD ms':>11}{'drafter':>9}" if isd else ""))
    for r in rows:
        print(f"{r['window']:>7}{r['ms']:>9.2f}{r['ratio_vs_1']:>7.2f}"
              + (f"{r['isd_ms']:>11.2f}{r['drafter_share']:>9.0%}" if isd else ""))
    if isd:
        print("as ISD: the last w // 2 rows are MASK rows (adapter on, draft vocabulary); drafter = its share")
    print(json.dumps({"prefix": a.prefix, "dtype": lm.dtype_name, "quant": lm.quant_mode, "results": rows}))
    return 0
