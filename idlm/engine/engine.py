"""``LLMEngine``: many requests, one batched forward per step.

Token ids only: the engine never tokenizes or parses text (the server and CLI do).

    engine = LLMEngine(model, EngineConfig(max_running=8))
    rid = engine.add_request(prompt_ids, SamplingParams(max_new_tokens=64), DecodeConfig(stride=3))
    while engine.has_unfinished():
        for out in engine.step():   # RequestOutput: tokens committed this step, finish reason
            ...
    engine.generate([ids1, ids2], params)   # blocking, for offline use

A step = ``Scheduler.schedule`` (continuous batching over the paged KV cache) → ``ModelRunner.run``
(one forward for every request's ISD window, AR token or prompt chunk) → per request the pure ISD
step of ``idlm.decode`` (verify drafts, emit, propose) → commit: the committed length is *set* to
``start + kept`` and the blocks past it are freed; stop on EOS / stop id / max tokens.

Every request decodes exactly as the batch-1 decoder would decode it alone (same tokens, bit for
bit, greedy or seeded): the kernels are row-stable, and a preempted request keeps its decoder state
and random sources and recomputes its K/V bit-identically.
"""

from __future__ import annotations

import itertools
import time

import torch
from tqdm import tqdm

from ..config import KV_BLOCK_DIVIDES, MAX_STRIDE, ConfigError, DecodeConfig, EngineConfig, SamplingParams
from ..decode import ISDState, isd_step, pick, randomness
from ..metrics import DecodeStats, EngineMetrics
from ..model.attention import KEY_BLOCK
from ..model.decoder import Decoder
from .block_manager import BlockManager
from .kv_pool import new_pool, num_blocks_for
from .request import Completion, Request, RequestOutput, Status, Stopper, TokenLogprob
from .runner import ModelRunner
from .scheduler import ScheduledItem, Scheduler, SchedulerConfig
from .stride import CostModel, WindowPolicy

assert KEY_BLOCK == KV_BLOCK_DIVIDES, "idlm.config.EngineConfig checks block sizes against attention.KEY_BLOCK"


class LLMEngine:
    def __init__(self, model: Decoder, config: EngineConfig | None = None, cost: CostModel | None = None):
        config = config or EngineConfig()
        self.model, self.config = model.eval(), config
        cfg = model.cfg
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        most = config.max_running * (self.max_model_len + DecodeConfig(stride=MAX_STRIDE).window)
        n_blocks = config.num_blocks or num_blocks_for(cfg, model.dtype, config.block_size, config.kv_cache_gb, most)
        self.blocks = BlockManager(n_blocks, config.block_size)
        self.pool = new_pool(cfg, model.dtype, n_blocks, config.block_size, model.embed.weight.device)
        self.metrics = EngineMetrics(kv_blocks_total=self.blocks.num_total)
        self.stride_policy = WindowPolicy(model, self.metrics, cost=cost)
        sched = SchedulerConfig(config.max_running, config.max_batched_tokens)
        self.scheduler = Scheduler(sched, self.blocks, cfg.mask_token_id, self.stride_policy)
        self.runner = ModelRunner(model, self.pool, self.blocks)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._aborted: list[Request] = []
        self.in_step: list[str] = []  # ids of the requests in the step being run

    # -- requests ---------------------------------------------------------------------------------

    def validate(self, prompt_ids: list[int], params: SamplingParams, decode: DecodeConfig) -> None:
        """Raise ``ConfigError`` (naming the field) if the request cannot be served. Reads only
        immutable engine settings, so it is safe to call from another thread."""
        if not isinstance(params, SamplingParams) or not isinstance(decode, DecodeConfig):
            raise ConfigError("params must be SamplingParams and decode a DecodeConfig", "params")
        if not prompt_ids:
            raise ConfigError("the prompt is empty", "prompt")
        vocab = self.model.cfg.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in prompt_ids):
            raise ConfigError(f"prompt token ids must be integers in [0, {vocab})", "prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise ConfigError(f"the prompt has {len(prompt_ids)} tokens; the context is {self.max_model_len}",
                              "prompt")
        if len(prompt_ids) + params.max_new_tokens > self.max_model_len:
            raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) "
                              f"exceeds the context of {self.max_model_len} tokens", "max_new_tokens")
        need = self.blocks.blocks_for(len(prompt_ids) + params.max_new_tokens + decode.window)
        if need > self.blocks.num_total:
            raise ConfigError(f"this request needs {need} KV blocks but the pool has {self.blocks.num_total}; "
                              "raise --kv-cache-gb or lower max_new_tokens", "max_new_tokens")

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    decode: DecodeConfig | None = None, request_id: str | None = None) -> str:
        """Queue a request; returns its id. Bad input raises ``ConfigError`` and changes nothing."""
        params = params if params is not None else SamplingParams()
        decode = decode if decode is not None else DecodeConfig()
        prompt_ids = list(prompt_ids)
        self.validate(prompt_ids, params, decode)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise ConfigError(f"request id {rid!r} is already in use", "request_id")
        gen, noise = randomness(params, decode.sampling_mode, self.model.cfg.vocab_size)
        stats = DecodeStats(stride=decode.max_stride, prompt_tokens=len(prompt_ids))
        req = Request(rid, prompt_ids, params, decode, next(self._arrivals), gen, noise,
                      Stopper(params, self.model.cfg.eos_token_ids), stats,
                      logprobs=[] if params.logprobs is not None else None,
                      prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        self.requests[rid] = req
        self.scheduler.add(req)
        self.metrics.requests_added += 1
        self._update_gauges()
        return rid

    def abort(self, request_id: str) -> bool:
        """Stop a request now: its blocks and decoder state go at once; the next ``step`` reports it
        with finish reason "abort". False if it is unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None or req.status is Status.FINISHED:
            return False
        self._finish(req, "abort")
        self._aborted.append(req)
        return True

    def drop_aborted(self) -> None:
        """Forget the pending "abort" outputs (their requests were told otherwise) and the requests."""
        for r in self._aborted:
            self.requests.pop(r.id, None)
        self._aborted = []

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._aborted)

    # -- capacity and counters --------------------------------------------------------------------

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV pool holds: blocks × block size."""
        return self.blocks.num_total * self.blocks.block_size

    def reset_metrics(self) -> None:
        """Zero the engine-wide counters (after a warm-up, before a measurement). In place: whoever
        holds ``metrics`` (the window policy, a Prometheus collector) sees the fresh counters."""
        self.metrics.reset()
        self._update_gauges()

    # -- the step ---------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One batched forward; returns an output for every request that committed tokens, finished
        or was aborted since the last step."""
        outputs = [self._output(r, []) for r in self._aborted]
        self._aborted = []
        t0 = time.perf_counter()
        self.in_step = [r.id for r in self.scheduler.running]  # what a failure in this step may have touched
        sched = self.scheduler.schedule()
        self.in_step = [it.request.id for it in sched.items] + [r.id for r in sched.preempted]
        m = self.metrics
        m.schedule_s += time.perf_counter() - t0
        m.preemptions += len(sched.preempted)
        if not sched.items:
            self._update_gauges()
            return outputs
        res = self.runner.run(sched.items, sched.stationary)
        m.stationary_steps += sched.stationary
        self.stride_policy.observe(res.num_rows, res.num_gated, res.forward_s)
        t1 = time.perf_counter()
        m.steps += 1
        m.rows += res.num_rows
        m.request_forwards += len(sched.items)
        m.prepare_s += res.prepare_s
        m.forward_s += res.forward_s
        for item, logits in zip(sched.items, res.rows):
            out = self._advance(item, logits)
            if out is not None:
                outputs.append(out)
        self._update_gauges()
        m.postprocess_s += time.perf_counter() - t1
        return outputs

    def _advance(self, item: ScheduledItem, logits: torch.Tensor) -> RequestOutput | None:
        """Apply one item's forward to its request: commit, emit, stop."""
        req = item.request
        req.stats.forwards += 1
        if item.window is None:  # a prompt chunk
            if req.scores_prompt:
                self._score_prompt(req, item, logits)
                logits = logits[-1:]
            req.num_computed = item.start + len(item.ids)
            if req.output:  # recomputing after a preemption
                self.metrics.recomputed_tokens += len(item.ids)
            else:
                self.metrics.prompt_tokens += len(item.ids)
            if not item.sample:
                return None
            tok = pick(logits, req.params, req.gen, req.noise, 0)[0]
            req.state = ISDState(tok)
            req.times.setdefault("first_token", time.perf_counter())
            return self._emit(req, [tok], logits, [False])
        win = item.window
        state = req.state.truncated(win.n_specs)  # a smaller stride than the drafting one drops specs
        step = isd_step(win.read(logits), state, req.step_settings(win.n_drafts))
        if req.decode.mode == "isd":  # one outcome, counted for the request and engine-wide
            for counters in (req.stats, self.metrics):
                counters.record(step.verified)
        req.num_computed = item.start + step.kept  # set from what was verified, never incremented
        req.state = step.next_state
        accepted = step.verdict.accepted if req.decode.mode == "isd" else 0
        return self._emit(req, step.emitted, logits, [i < accepted for i in range(len(step.emitted))])

    def _score_prompt(self, req: Request, item: ScheduledItem, logits: torch.Tensor) -> None:
        """Row i of a chunk at ``start`` predicts prompt token start + i + 1 (the causal anchor). Rows
        already scored (a chunk recomputed after a preemption) are skipped."""
        lo = len(req.prompt_logprobs) - 1 - item.start  # first row predicting an unscored token
        hi = min(len(item.ids), len(req.prompt) - 1 - item.start)
        if hi > lo:
            targets = req.prompt[item.start + 1 + lo: item.start + 1 + hi]
            req.prompt_logprobs.extend(self._token_logprobs(logits[lo:hi], targets, req.params.prompt_logprobs or 0))

    def _emit(self, req: Request, emitted: list[int], logits: torch.Tensor, drafted: list[bool]) -> RequestOutput:
        before = len(req.output)
        first = before == 0
        done = req.stopper.push(emitted)
        new = req.output[before:]
        self.metrics.generation_tokens += len(new)
        lps = self._logprobs(req, new, logits) if req.logprobs is not None else None
        if lps:
            req.logprobs.extend(lps)
        if req.noise is not None:
            req.noise.forget_before(len(req.output))
        if done:
            self._finish(req, req.stopper.finish_reason or "length")
        else:
            self.blocks.truncate(req.id, req.num_computed)  # rollback: free the blocks past the commit
        return self._output(req, new, lps, drafted[: len(new)], req.prompt_logprobs if first else None)

    def _logprobs(self, req: Request, new: list[int], logits: torch.Tensor) -> list[TokenLogprob]:
        """Row i of the item's logits is the anchor of the i-th emitted token."""
        return self._token_logprobs(logits[: len(new)], new, req.params.logprobs or 0) if new else []

    @staticmethod
    def _token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
        """Raw-logit log-probabilities of ``tokens`` (one per row) and the top ``k`` alternatives."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        chosen = lp[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
        top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
        out = []
        for i, tok in enumerate(tokens):
            top = tuple(zip(top_i[i].tolist(), top_v[i].tolist())) if k else ()
            out.append(TokenLogprob(tok, chosen[i], top))
        return out

    def _finish(self, req: Request, reason: str) -> None:
        """Release every block and all decoder state of ``req`` at once."""
        self.scheduler.remove(req)
        req.finish_reason = reason
        req.state = None
        req.noise = None
        req.num_computed = 0
        req.stats.tokens = len(req.output)
        req.times["finished"] = time.perf_counter()
        req.stats.seconds = req.times["finished"] - req.times["added"]
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1

    def _output(self, req: Request, new: list[int], lps: list[TokenLogprob] | None = None,
                drafted: list[bool] | None = None, prompt_lps: list | None = None) -> RequestOutput:
        fin = req.status is Status.FINISHED
        return RequestOutput(req.id, new, fin, req.finish_reason if fin else None, len(req.prompt), len(req.output),
                             lps if req.logprobs is not None else None, req.stats if fin else None,
                             drafted if drafted is not None else [False] * len(new),
                             list(prompt_lps) if prompt_lps is not None else None)

    def _update_gauges(self) -> None:
        m = self.metrics
        m.running, m.waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        m.kv_blocks_used = self.blocks.num_used

    # -- offline ----------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 decode: DecodeConfig | list[DecodeConfig] | None = None, progress: bool = False) -> list[Completion]:
        """Run ``prompts`` to completion (all queued at once; the engine batches them) and return
        their completions in order."""
        n = len(prompts)
        ps = params if isinstance(params, list) else [params] * n
        ds = decode if isinstance(decode, list) else [decode] * n
        ids = [self.add_request(p, sp, dc) for p, sp, dc in zip(prompts, ps, ds)]
        bar = tqdm(total=n, desc="generate", disable=not progress, leave=False)
        pending = set(ids)
        while pending:
            for out in self.step():
                if out.finished and out.request_id in pending:
                    pending.discard(out.request_id)
                    bar.update(1)
        bar.close()
        return [self.completion(i) for i in ids]

    def completion(self, request_id: str) -> Completion:
        r = self.requests[request_id]
        return Completion(r.id, r.prompt, list(r.output), r.finish_reason or "", r.stats, r.logprobs,
                          r.times.get("finished", time.perf_counter()) - r.times["added"], r.prompt_logprobs)

    def release(self, request_id: str) -> None:
        """Forget a finished request (long-running servers call this once its output is delivered)."""
        req = self.requests.get(request_id)
        if req is not None and req.status is Status.FINISHED:
            del self.requests[request_id]
