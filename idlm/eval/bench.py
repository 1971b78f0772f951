"""Throughput bench: the engine (AR and ISD, at several concurrencies), the batch-1 decoders and
transformers' ``generate`` on the same prompts, in one process, one after the other, so the ratios are
measured side by side.

At concurrency C the bench behaves like a client that keeps C requests in flight: it submits a new
prompt whenever one finishes. Latency is from submission to the last token. ``identical`` is the
fraction of requests whose tokens equal that request decoded alone by the batch-1 AR decoder (the
test oracle; for coupled sampling too, since coupled ISD equals coupled AR token for token).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm

from ..config import DecodeConfig, SamplingParams
from ..decode import ar_generate, isd_generate
from ..engine import CostModel, EngineConfig, LLMEngine
from ..metrics import DecodeStats
from ..model import LoadedModel

B1_MODES = ("ar-b1", "isd-b1")  # the batch-1 reference decoders, one request at a time
MODES = ("ar", "isd", "hf", "llamacpp", *B1_MODES)
LLAMACPP_HINT = ("--modes llamacpp needs llama-cpp-python: pip install '.[compare]' (or 'idlm[compare]'; PyPI has "
                 "only its source, which builds in ~5 minutes)")


@dataclass
class RunResult:
    mode: str  # ar | isd (engine), hf, llamacpp, ar-b1 | isd-b1 (batch-1 decoders)
    stride: int | str  # N (1 for AR), or "auto"
    fallback: bool | str  # ISD fallback drafts: on, off, or auto (chosen per step)
    concurrency: int  # requests in flight
    tree: int = 0  # ISD draft-tree branches per window (at most)
    seconds: float = 0.0  # wall time of the whole run
    outputs: list[list[int]] = field(default_factory=list)  # generated ids per prompt, in prompt order
    latencies: list[float] = field(default_factory=list)  # per prompt: submission -> last token
    stats: list[DecodeStats] = field(default_factory=list)
    identical: float | None = None  # fraction equal to the batch-1 AR oracle
    steps: int = 0  # batched forwards (engine)
    overhead_ratio: float | None = None  # engine scheduling + bookkeeping time / forward time
    strides_chosen: Counter = field(default_factory=Counter)  # adaptive windows: steps per choice ("N3+fb")
    quality: dict[str, float] | None = None  # GSM8K accuracy of the outputs (strict / flexible), when scored

    @property
    def tokens(self) -> int:
        return sum(len(o) for o in self.outputs)

    @property
    def forwards(self) -> int:
        return sum(s.forwards for s in self.stats) if self.stats else self.tokens

    @property
    def total_tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def per_request_tokens_per_s(self) -> float:
        rates = [len(o) / t for o, t in zip(self.outputs, self.latencies) if t > 0]
        return sum(rates) / len(rates) if rates else 0.0

    @property
    def tpf(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def latency(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0

    def acceptance_at(self) -> list[float]:
        n = max((len(s.tested_at) for s in self.stats), default=0)
        tested = [sum(s.tested_at[j] for s in self.stats if j < len(s.tested_at)) for j in range(n)]
        acc = [sum(s.accepted_at[j] for s in self.stats if j < len(s.accepted_at)) for j in range(n)]
        return [a / t if t else 0.0 for a, t in zip(acc, tested)]

    def to_json(self) -> dict:
        d = {"mode": self.mode, "stride": self.stride, "concurrency": self.concurrency,
             "total_tokens_per_s": round(self.total_tokens_per_s, 3),
             "per_request_tokens_per_s": round(self.per_request_tokens_per_s, 3), "tpf": round(self.tpf, 4),
             "latency_p50_s": round(self.latency(0.5), 4), "latency_p90_s": round(self.latency(0.9), 4),
             "identical": self.identical, "tokens": self.tokens, "forwards": self.forwards,
             "seconds": round(self.seconds, 3), "requests": len(self.outputs)}
        if self.mode in ("isd", "isd-b1"):
            d["fallback"] = self.fallback
            d["tree"] = self.tree
            d["acceptance_at"] = [round(x, 4) for x in self.acceptance_at()]
        if self.mode in ("ar", "isd"):
            d["steps"] = self.steps
            d["overhead_ratio"] = round(self.overhead_ratio or 0.0, 4)
        if self.quality is not None:
            d["gsm8k"] = {k: round(v, 4) for k, v in self.quality.items()}
        if self.strides_chosen:
            d["strides_chosen"] = {str(k): v for k, v in sorted(self.strides_chosen.items())}
        return d


@dataclass(frozen=True)
class BenchPlan:
    """Everything one ``idlm bench`` run measures: each mode at each concurrency, each ISD configuration,
    ``repeats`` times round-robin (the median run is reported), against one batch-1 AR oracle."""

    modes: tuple[str, ...]  # of MODES
    decodes: tuple[DecodeConfig, ...]  # the ISD configurations (stride x fallback x tree)
    concurrency: tuple[int, ...]  # requests in flight, one engine run each
    params: SamplingParams  # the same for every run
    engine: EngineConfig = field(default_factory=EngineConfig)  # max_running is set per concurrency
    repeats: int = 1
    gguf: str | None = None  # llamacpp mode: the model's GGUF file
    hf_dtype: torch.dtype = torch.bfloat16  # hf mode: transformers' weights dtype


def _plan_runs(lm: LoadedModel, prompts: list[list[int]], plan: BenchPlan) -> list[Callable[[], RunResult]]:
    """One thunk per measured configuration; the batch-1 and peer modes run once per repeat."""
    cost = CostModel.for_model(lm.model) if "isd" in plan.modes and any(d.adaptive for d in plan.decodes) else None
    p, e = plan.params, plan.engine
    runs: list[Callable[[], RunResult]] = []
    for c in plan.concurrency:
        for m in plan.modes:
            if m == "ar":
                runs.append(lambda c=c: run_engine(lm, prompts, DecodeConfig(mode="ar"), p, c, e, cost, f"ar C={c}"))
            elif m == "isd":
                runs += [lambda c=c, d=d: run_engine(lm, prompts, d, p, c, e, cost, f"isd N={d.stride} C={c}")
                         for d in plan.decodes]
            elif c != plan.concurrency[0]:
                continue  # one-at-a-time references: once per repeat
            elif m == "ar-b1":
                runs.append(lambda: run_batch1(lm, prompts, DecodeConfig(mode="ar"), p, "ar-b1"))
            elif m == "isd-b1":
                runs += [lambda d=d: run_batch1(lm, prompts, d, p, f"isd-b1 N={d.stride}")
                         for d in plan.decodes if not d.auto]
            elif m == "llamacpp":
                runs.append(lambda: run_llamacpp(plan.gguf, prompts, p, lm.model.cfg.eos_token_ids,
                                                 torch.get_num_threads()))
            else:
                runs.append(lambda: run_hf(lm, prompts, p, plan.hf_dtype))
    return runs


def run_plan(lm: LoadedModel, prompts: list[list[int]], plan: BenchPlan) -> list[RunResult]:
    """Run the plan: the batch-1 AR oracle first, then every configuration ``repeats`` times round-robin;
    returns the median run (by total tok/s) of each, with ``identical`` filled in against the oracle."""
    oracle = run_batch1(lm, prompts, DecodeConfig(mode="ar", sampling_mode=plan.decodes[0].sampling_mode),
                        plan.params, desc="oracle: batch-1 AR")
    runs = _plan_runs(lm, prompts, plan)
    trials: list[list[RunResult]] = [[] for _ in runs]
    for _ in range(plan.repeats):
        for k, run in enumerate(runs):
            trials[k].append(run())
    results = [sorted(t, key=lambda r: r.total_tokens_per_s)[len(t) // 2] for t in trials]
    for r in results:
        r.identical = round(sum(a == b for a, b in zip(oracle.outputs, r.outputs)) / len(prompts), 4)
    return results


def score_outputs(results: list[RunResult], task, examples: list, tokenizer) -> None:
    """Fill in each run's ``quality``: the task's mean scores of its decoded outputs (GSM8K strict / flexible)."""
    for r in results:
        sc = [task.score(e, tokenizer.decode(o, skip_special_tokens=True)).values for e, o in zip(examples, r.outputs)]
        r.quality = {k: sum(v[k] for v in sc) / len(sc) for k in sc[0]}


def run_engine(lm: LoadedModel, prompts: list[list[int]], cfg: DecodeConfig, params: SamplingParams,
               concurrency: int, engine_cfg: EngineConfig, cost: CostModel | None = None,
               desc: str = "") -> RunResult:
    """Serve ``prompts`` through a fresh engine with at most ``concurrency`` requests in flight."""
    stride = 1 if cfg.mode == "ar" else cfg.stride
    res = RunResult(cfg.mode, stride, cfg.fallback if cfg.mode == "isd" else False, concurrency, cfg.tree)
    eng = LLMEngine(lm.model, replace(engine_cfg, max_running=concurrency), cost=cost)
    eng.generate([prompts[0][:16]], SamplingParams(max_new_tokens=4), cfg)  # warm-up, not timed
    eng.reset_metrics()
    eng.stride_policy.chosen.clear()
    n = len(prompts)
    res.outputs, res.latencies, res.stats = [[]] * n, [0.0] * n, [DecodeStats()] * n
    todo, inflight = list(range(n)), {}
    bar = tqdm(total=n, desc=desc, leave=False, disable=None)
    t0 = time.perf_counter()
    while todo or inflight:
        while todo and len(inflight) < concurrency:
            i = todo.pop(0)
            inflight[eng.add_request(prompts[i], params, cfg)] = i
        for out in eng.step():
            if out.finished and out.request_id in inflight:
                i = inflight.pop(out.request_id)
                c = eng.completion(out.request_id)
                res.outputs[i], res.latencies[i], res.stats[i] = c.token_ids, c.latency_s, c.stats
                bar.update(1)
    res.seconds = time.perf_counter() - t0
    bar.close()
    res.steps, res.overhead_ratio = eng.metrics.steps, eng.metrics.overhead_ratio
    res.strides_chosen = Counter({(f"N{n}" if n else "") + ("+fb" if fb else "-fb"): c
                                  for (n, fb), c in eng.stride_policy.chosen.items()})
    return res


def run_batch1(lm: LoadedModel, prompts: list[list[int]], cfg: DecodeConfig, params: SamplingParams,
               desc: str = "") -> RunResult:
    """The batch-1 reference decoders, one prompt after the other."""
    isd = cfg.mode == "isd"
    res = RunResult("isd-b1" if isd else "ar-b1", cfg.stride if isd else 1, isd and cfg.may_fallback, 1,
                    cfg.tree if isd else 0)
    t0 = time.perf_counter()
    for ids in tqdm(prompts, desc=desc, leave=False, disable=None):
        out = isd_generate(lm.model, ids, cfg, params) if isd else \
            ar_generate(lm.model, ids, params, sampling_mode=cfg.sampling_mode)
        res.outputs.append(out.tokens)
        res.latencies.append(out.stats.seconds)
        res.stats.append(out.stats)
    res.seconds = time.perf_counter() - t0
    return res


def run_hf(lm: LoadedModel, prompts: list[list[int]], params: SamplingParams, dtype: torch.dtype) -> RunResult:
    """transformers' greedy ``generate`` on the same weights (the folder our model was loaded from)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = AutoModelForCausalLM.from_pretrained(str(lm.folder), dtype=dtype).eval()
    eos = None if params.ignore_eos else list(lm.model.cfg.eos_token_ids) or None
    res = RunResult("hf", 1, False, 1)
    t0 = time.perf_counter()
    for ids in tqdm(prompts, desc="hf", leave=False, disable=None):
        x = torch.tensor([ids])
        t = time.perf_counter()
        with torch.inference_mode():
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_new_tokens,
                            do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else 0)
        res.latencies.append(time.perf_counter() - t)
        res.outputs.append(y[0, len(ids):].tolist())
    res.seconds = time.perf_counter() - t0
    return res


def llamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def run_llamacpp(gguf_path: str, prompts: list[list[int]], params: SamplingParams, eos: tuple[int, ...],
                 threads: int) -> RunResult:
    """llama.cpp (through llama-cpp-python) greedy on the same GGUF file and the same prompt token ids,
    one prompt after the other with ``threads`` threads: the peer a CPU user would pick."""
    from llama_cpp import Llama

    if not params.greedy:
        raise ValueError("the llamacpp bench mode runs greedy decoding only (use --temperature 0)")
    n_ctx = max(len(p) for p in prompts) + params.max_new_tokens + 8
    llm = Llama(model_path=gguf_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)
    stop = set() if params.ignore_eos else set(eos) | set(params.stop_token_ids)

    def one(ids: list[int]) -> list[int]:
        out: list[int] = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            out.append(int(t))
            if len(out) >= params.max_new_tokens or t in stop:
                break
        return out

    one(prompts[0][:16])  # warm-up, not timed
    res = RunResult("llamacpp", 1, False, 1)
    t0 = time.perf_counter()
    for ids in tqdm(prompts, desc="llamacpp", leave=False, disable=None):
        t = time.perf_counter()
        res.outputs.append(one(ids))
        res.latencies.append(time.perf_counter() - t)
    res.seconds = time.perf_counter() - t0
    llm.close()
    return res


def forward_cost(lm: LoadedModel, prefix: int, windows: list[int], reps: int = 20) -> list[dict]:
    """Median wall time of one forward (hidden + logits at every window slot) appending ``w`` tokens to a
    ``prefix``-token cache, for each w; windows are measured interleaved so machine noise hits all alike.
    With a drafter (gated adapter or draft vocabulary) each w is also timed as ISD runs it: the last w // 2
    rows are MASK rows (adapter on, scoring the draft vocabulary), so the drafter's share is the difference."""
    model = lm.model
    cache = model.new_cache(capacity=prefix + max(windows) + 1)
    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.vocab_size
    drafter = model.has_adapters or model.draft_vocab is not None
    kinds = (False, True) if drafter else (False,)
    times: dict[tuple[int, bool], list[float]] = {(w, d): [] for w in windows for d in kinds}
    with torch.inference_mode():
        model.hidden(torch.randint(0, vocab, (prefix,), generator=gen), torch.arange(prefix), cache)
        for rep in range(reps + 2):
            for w in windows:
                for isd in kinds:
                    ids = torch.randint(0, vocab, (w,), generator=gen)
                    drafts = torch.zeros(w, dtype=torch.bool)
                    if isd:
                        drafts[w - w // 2:] = True
                        ids[drafts] = model.cfg.mask_token_id
                    gate = drafts.float() if isd and model.has_adapters else None
                    t = time.perf_counter()
                    model.logits(model.hidden(ids, prefix + torch.arange(w), cache, gate=gate)[0],
                                 drafts if isd else None)
                    dt = time.perf_counter() - t
                    cache.crop(prefix)
                    if rep >= 2:  # two warm-up rounds
                        times[(w, isd)].append(dt)
    med = {k: sorted(ts)[len(ts) // 2] for k, ts in times.items()}
    base = med.get((1, False)) or med[(windows[0], False)]
    rows = []
    for w in windows:
        row = {"window": w, "ms": round(1000 * med[(w, False)], 2), "ratio_vs_1": round(med[(w, False)] / base, 3)}
        if drafter:
            row["isd_ms"] = round(1000 * med[(w, True)], 2)
            row["drafter_share"] = round(1 - med[(w, False)] / med[(w, True)], 3)
        rows.append(row)
    return rows
