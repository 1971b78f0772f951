"""Batch-1 reference decoders over a croppable KV cache: Introspective Strided Decoding (spec §3)
and plain AR decoding of the same network. These are the test oracle and the CLI's decoders.

One ISD step is "extend the cache by a window, keep m slots" (spec §3.6, pitfall 5):

    window = [pending] + specs + [MASK] * (N-1)  (+ MASK padding to 2N-1 if asked)
    slots:    0          1..s     s+1 .. s+N-1

* specs[j] is checked against the anchor p at slot j (the slot before it, logit shift §1.5).
* If all s specs pass: emit specs + [clean], where clean is drawn from p at slot s; the MASKs at
  slots s+1..s+N-1 propose the next N-1 drafts; keep 1+s slots (pending + specs).
* If specs[j] is rejected: emit specs[:j] + [correction]; keep 1+j slots. This step's clean token
  and MASK drafts were conditioned on rejected text (pitfall 6), so without fallback the next step
  is a cold step (no specs) from the correction.

Fallback drafts (``DecodeConfig.fallback``, on by default; our addition, not in the reference):
after the main MASKs the window holds, for each spec j, a branch of N-1 MASK slots at the positions
of specs[j], specs[j]+1, ... that see only the committed text, pending and specs[:j] (not specs[j:]).
If specs[j] is rejected, that branch has drafted the N-1 tokens after the correction exactly as a
cold step from the correction would (the MASK at the correction's position stands in for it, as the
MASK at the clean token's position does in every step), so the next step verifies instead of
starting cold. Branch slots come last in the window, so no clean slot sees them and the verified
text, and hence the output, is unchanged; their K/V is cropped with the rest of the window.

Prefill is the same forward AR runs; its last slot gives the first token, and the first step is a
cold step. (Appending N-1 MASKs to the prefill would save that forward, but a longer prefill rounds
differently in the attention kernel, which breaks bit-exact equality with AR; see README, Numerics.)

Invariant after every step: committed cache length = prompt + emitted - 1 (the pending token, or
the correction, is emitted before its KV exists) and no MASK slot survives.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import DecodeConfig, SamplingParams
from ..metrics import DecodeStats
from ..model.decoder import Decoder, KVCache
from .sampling import draw, make_generator, next_token, target_probs
from .verify import Verdict, verify_greedy, verify_sampled


@dataclass
class ISDState:
    """What the next window needs: the pending token and the drafts to verify."""

    pending: int  # emitted token whose KV is not in the cache yet
    specs: list[int] = field(default_factory=list)  # drafts proposed by the previous forward
    spec_q: torch.Tensor | None = None  # (len(specs), V) draft distributions q (sampling only)


@dataclass(frozen=True)
class StepResult:
    emitted: list[int]  # tokens released to the user this step, in order
    kept: int  # window slots whose KV stays committed
    verdict: Verdict  # outcome of checking the previous drafts
    next_state: ISDState


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids (stop token included when generation stopped on it)
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    stats: DecodeStats


def propose(draft_logits: torch.Tensor, params: SamplingParams, sampling_mode: str,
            gen: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
    """Drafts from MASK logits (k, V): argmax when greedy or in reference mode, else sampled from q.
    Returns (drafts, q) where q is what verification will divide by (None when greedy)."""
    if params.greedy:
        return torch.argmax(draft_logits, dim=-1).tolist(), None
    if sampling_mode == "reference":  # point-mass proposal, q = softmax(logits / T) (spec §3.4)
        q = torch.softmax(draft_logits.float() / params.temperature, dim=-1)
        return torch.argmax(draft_logits, dim=-1).tolist(), q
    q = target_probs(draft_logits, params)
    return draw(q, gen).tolist(), q


def check_specs(anchor_logits: torch.Tensor, state: ISDState, params: SamplingParams, sampling_mode: str,
                gen: torch.Generator | None) -> Verdict:
    """Verify state.specs against anchor logits (len(specs), V)."""
    if params.greedy:
        return verify_greedy(anchor_logits, state.specs)
    if sampling_mode == "reference":  # reference verifies against the un-truncated p
        p = torch.softmax(anchor_logits.float() / params.temperature, dim=-1)
    else:
        p = target_probs(anchor_logits, params)
    return verify_sampled(p, state.spec_q, state.specs, gen)


def window_layout(n_specs: int, n_drafts: int, fallback: bool) -> tuple[list[int], torch.Tensor]:
    """Slots of one window: position offsets from the pending token, and the (T, T) mask of which
    window slots each slot sees. Main chain: pending, specs, N-1 MASKs (causal). Then, with
    ``fallback``, one branch of N-1 MASKs per spec j at offsets j+1.., seeing main slots 0..j and
    its own earlier slots. (Fresh copies of a cached layout: callers may extend them.)"""
    offsets, mask = _layout(n_specs, n_drafts, fallback)
    return list(offsets), mask.clone()


@functools.lru_cache(maxsize=64)
def _layout(n_specs: int, n_drafts: int, fallback: bool) -> tuple[tuple[int, ...], torch.Tensor]:
    main = 1 + n_specs + n_drafts
    branches = n_specs if fallback else 0
    t = main + branches * n_drafts
    offsets = list(range(main))
    mask = torch.zeros(t, t, dtype=torch.bool)
    mask[:main, :main] = torch.ones(main, main, dtype=torch.bool).tril()
    for j in range(branches):
        base = main + j * n_drafts
        offsets += range(j + 1, j + 1 + n_drafts)
        mask[base: base + n_drafts, : j + 1] = True
        mask[base: base + n_drafts, base: base + n_drafts] = torch.ones(n_drafts, n_drafts, dtype=torch.bool).tril()
    return tuple(offsets), mask


def isd_step(logits: torch.Tensor, state: ISDState, n_drafts: int, params: SamplingParams,
             sampling_mode: str = "exact", gen: torch.Generator | None = None,
             fallback_logits: torch.Tensor | None = None) -> StepResult:
    """Pure ISD step: window logits (>= 1 + s + n_drafts, V) -> what to emit, keep and do next.
    ``fallback_logits`` (s, n_drafts, V): branch j's MASK logits, drafting after a rejected specs[j]."""
    s = len(state.specs)
    verdict = check_specs(logits[:s], state, params, sampling_mode, gen)
    if verdict.correction is not None:
        j = verdict.accepted
        emitted = state.specs[:j] + [verdict.correction]
        if fallback_logits is None:
            return StepResult(emitted, 1 + j, verdict, ISDState(verdict.correction))
        drafts, q = propose(fallback_logits[j], params, sampling_mode, gen)
        return StepResult(emitted, 1 + j, verdict, ISDState(verdict.correction, drafts, q))
    clean = next_token(logits[s], params, gen)
    drafts, q = propose(logits[s + 1: s + 1 + n_drafts], params, sampling_mode, gen)
    return StepResult(state.specs + [clean], 1 + s, verdict, ISDState(clean, drafts, q))


class _Stopper:
    """Appends emitted tokens one at a time and decides when generation ends (spec §3.6 Stop/EOS)."""

    def __init__(self, params: SamplingParams, eos_ids: tuple[int, ...]):
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def push(self, emitted: list[int]) -> bool:
        """Append; return True when finished (tokens after the finishing one are dropped)."""
        for t in emitted:
            self.tokens.append(t)
            if t in self.stop_ids:
                self.finish_reason = "stop"
            elif len(self.tokens) >= self.params.max_new_tokens:
                self.finish_reason = "length"
            if self.finish_reason:
                return True
        return False


StepHook = Callable[[KVCache, list[int], ISDState | None], None]


@torch.inference_mode()
def isd_generate(model: Decoder, prompt: list[int], cfg: DecodeConfig, params: SamplingParams,
                 on_step: StepHook | None = None) -> DecodeResult:
    """Decode with ISD at stride cfg.stride. ``on_step(cache, tokens, state)`` runs after every
    step (tests check the KV invariants there)."""
    if not prompt:
        raise ValueError("empty prompt")
    t_start = time.perf_counter()
    n_drafts, mask = cfg.n_drafts, cfg.mask_token_id if cfg.mask_token_id is not None else model.cfg.mask_token_id
    gen = make_generator(params.seed)
    stats = DecodeStats(stride=cfg.stride, prompt_tokens=len(prompt))
    stop = _Stopper(params, model.cfg.eos_token_ids)
    cache = model.new_cache(capacity=len(prompt) + params.max_new_tokens + 2 * cfg.window)

    gated = model.has_adapters  # R-ISD: adapters act on draft MASK slots only, so the anchor is the base

    # 1. Prefill exactly as AR does; the first token comes from the last prompt slot. The first step
    #    is then a cold step [t0, MASK * (N-1)] that yields the clean token and the first drafts.
    p_len = len(prompt)
    hidden = model.hidden(torch.tensor(prompt), torch.arange(p_len), cache)[0]
    stats.forwards += 1
    t0 = next_token(model.logits(hidden[-1:])[0], params, gen)
    state = ISDState(t0)
    done = stop.push([t0])
    if on_step:
        on_step(cache, stop.tokens, state)

    # 2. Steps: extend by a window, keep 1 + accepted, emit accepted + clean/correction.
    while not done:
        s = len(state.specs)
        offsets, seen = window_layout(s, n_drafts, cfg.fallback)
        used = len(offsets)  # slots whose logits are read
        window = [state.pending] + state.specs + [mask] * (used - 1 - s)
        pad = cfg.window - used if cfg.pad_windows else 0
        if pad:  # padding MASKs: causal, never read, gate off
            window += [mask] * pad
            offsets += range(offsets[-1] + 1, offsets[-1] + 1 + pad)
            full = torch.ones(used + pad, used + pad, dtype=torch.bool).tril()
            full[:used, :used] = seen
            seen = full
        start = cache.length
        gate = None
        if gated:  # 1 on every draft MASK (main chain and fallback branches), 0 on clean slots and padding
            gate = torch.zeros(len(window))
            gate[1 + s: used] = 1.0
        hidden = model.hidden(torch.tensor(window), start + torch.tensor(offsets), cache, gate=gate,
                              window_mask=seen if used > 1 + s + n_drafts else None)[0]
        logits = model.logits(hidden[:used])
        stats.forwards += 1
        main = 1 + s + n_drafts
        fb = logits[main:].view(s, n_drafts, -1) if used > main else None
        step = isd_step(logits[:main], state, n_drafts, params, cfg.sampling_mode, gen, fb)
        stats.record_verify(s, step.verdict.accepted)
        cache.crop(start + step.kept)
        state = step.next_state
        done = stop.push(step.emitted)
        if done:  # tokens after a stop were dropped: drop their KV too, keeping the invariant exact
            cache.crop(min(cache.length, p_len + len(stop.tokens) - 1))
        if on_step:
            on_step(cache, stop.tokens, state)

    stats.tokens = len(stop.tokens)
    stats.seconds = time.perf_counter() - t_start
    return DecodeResult(stop.tokens, stop.finish_reason or "length", stats)


@torch.inference_mode()
def ar_generate(model: Decoder, prompt: list[int], params: SamplingParams,
                on_step: StepHook | None = None) -> DecodeResult:
    """Plain autoregressive decoding of the same network: one token per forward."""
    if not prompt:
        raise ValueError("empty prompt")
    t_start = time.perf_counter()
    gen = make_generator(params.seed)
    stats = DecodeStats(stride=1, prompt_tokens=len(prompt))
    stop = _Stopper(params, model.cfg.eos_token_ids)
    cache = model.new_cache(capacity=len(prompt) + params.max_new_tokens + 1)
    hidden = model.hidden(torch.tensor(prompt), torch.arange(len(prompt)), cache)[0]
    tok = next_token(model.logits(hidden[-1:])[0], params, gen)
    stats.forwards += 1
    done = stop.push([tok])
    while not done:
        if on_step:
            on_step(cache, stop.tokens, None)
        start = cache.length
        hidden = model.hidden(torch.tensor([tok]), torch.tensor([start]), cache)[0]
        tok = next_token(model.logits(hidden[-1:])[0], params, gen)
        stats.forwards += 1
        done = stop.push([tok])
    stats.tokens = len(stop.tokens)
    stats.seconds = time.perf_counter() - t_start
    return DecodeResult(stop.tokens, stop.finish_reason or "length", stats)


def generate(model: Decoder, prompt: list[int], cfg: DecodeConfig, params: SamplingParams) -> DecodeResult:
    """Dispatch on cfg.mode."""
    if cfg.mode == "ar":
        return ar_generate(model, prompt, params)
    return isd_generate(model, prompt, cfg, params)
