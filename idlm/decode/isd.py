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

Draft trees (``DecodeConfig.tree`` = K > 0; our addition): where the drafter is unsure, a window also
carries its second choice alts[j] for spec j, followed by its own chain, as one more branch at the
positions of specs[j], specs[j]+1, ... that sees what fallback branch j sees: [alts[j], MASK * (N-2)].
alts[j] is a clean slot (adapter gate off), so if specs[j] is rejected and the correction is alts[j],
its logits are the base model's exact distribution of the token after the correction, and the MASKs
draft the ones after that: the next step's specs are [that token, drafts], the first sure to pass.
A window holds at most K such branches, at the spec positions whose P(reached and the correction is
the alternative) = prod_{i<j} q_i(specs[i]) * q_j(alts[j]) is largest (at least TREE_MIN_VALUE).
Like fallback branches, tree slots come last and are never kept, so output is unchanged.

Prefill is the same forward AR runs; its last slot gives the first token, and the first step is a
cold step. (Appending N-1 MASKs to the prefill would save that forward, but a longer prefill rounds
differently in the attention kernel, which breaks bit-exact equality with AR; see README, Numerics.)

Invariant after every step: committed cache length = prompt + emitted - 1 (the pending token, or
the correction, is emitted before its KV exists) and no MASK slot survives.
"""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, DecodeConfig, SamplingParams
from ..metrics import DecodeStats, VerifyStep
from ..model.decoder import Decoder, KVCache
from .sampling import KeyedNoise, draw, keyed_argmax, make_generator, pick, target_probs
from .stop import StopRule
from .verify import Verdict, verify_greedy, verify_keyed, verify_sampled

TREE_MIN_VALUE = 0.05  # a tree branch is added only where it is used with at least this estimated probability


@dataclass
class ISDState:
    """What the next window needs: the pending token and the drafts to verify."""

    pending: int  # emitted token whose KV is not in the cache yet
    specs: list[int] = field(default_factory=list)  # drafts proposed by the previous forward
    spec_q: torch.Tensor | None = None  # (len(specs), V) draft distributions q (exact/reference sampling)
    alts: list[int] = field(default_factory=list)  # draft trees: the drafter's best other token at each spec
    alt_value: list[float] = field(default_factory=list)  # estimated P(the step reaches j and corrects to alts[j])

    def truncated(self, n: int) -> ISDState:
        """The state with only its first n specs (a step at a smaller stride verifies fewer drafts)."""
        if n >= len(self.specs):
            return self
        return ISDState(self.pending, self.specs[:n], None if self.spec_q is None else self.spec_q[:n],
                        self.alts[:n], self.alt_value[:n])

    def tree_positions(self, budget: int) -> tuple[int, ...]:
        """Spec positions that get a tree branch: at most ``budget``, the most valuable first, each
        worth at least TREE_MIN_VALUE; in increasing order."""
        if budget <= 0 or not self.alts:
            return ()
        ranked = sorted(range(len(self.alts)), key=lambda j: -self.alt_value[j])
        return tuple(sorted(j for j in ranked[:budget] if self.alt_value[j] >= TREE_MIN_VALUE))


@dataclass(frozen=True)
class StepResult:
    emitted: list[int]  # tokens released to the user this step, in order
    kept: int  # window slots whose KV stays committed
    verdict: Verdict  # outcome of checking the previous drafts
    next_state: ISDState
    branch: str  # where the next drafts come from: "main" chain, "fallback" or "tree" branch, or none ("cold")
    verified: VerifyStep  # what the step verified: DecodeStats and EngineMetrics record it


@dataclass(frozen=True)
class WindowLogits:
    """One window's logits, split by role (``Window.read``): what ``isd_step`` reads."""

    main: torch.Tensor  # (>= 1 + s + n_drafts, V): anchors of the s specs, the clean slot, the MASK drafts
    fallback: torch.Tensor | None = None  # (s, n_drafts, V): branch j drafts after a rejected specs[j]
    tree: torch.Tensor | None = None  # (len(tree_at), n_drafts, V): tree branches, alternative's slot first
    tree_at: tuple[int, ...] = ()  # the spec position each tree branch stands for (ISDState.alts[j])


@dataclass(frozen=True)
class StepSettings:
    """How one request decodes one step: its sampling rule, random sources and output index."""

    n_drafts: int  # N-1 MASKs drafting the next specs (0 = an AR step)
    params: SamplingParams  # temperature, top-k, top-p of the anchor p and the draft q
    sampling_mode: str = "exact"  # "exact", "reference" or "coupled" (DecodeConfig.sampling_mode)
    gen: torch.Generator | None = None  # exact / reference randomness, consumed in order
    noise: KeyedNoise | None = None  # coupled randomness, keyed by output index
    index: int = 0  # output index of specs[0] (= tokens emitted so far)
    alternatives: bool = False  # the next state carries second choices for the next window's tree branches


@dataclass
class DecodeResult:
    tokens: list[int]  # generated ids (stop token included when generation stopped on it)
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    stats: DecodeStats


@dataclass(frozen=True)
class Window:
    """The input of one ISD step for one sequence, appended after its committed KV."""

    ids: list[int]  # pending, specs, main MASKs, fallback-branch MASKs, tree branches, padding MASKs
    offsets: list[int]  # position of each slot relative to the pending token
    mask: torch.Tensor | None  # (T, T) bool: which window slots each slot sees (None = causal)
    n_specs: int  # drafts being verified (slots 1..n_specs)
    n_drafts: int  # N-1: MASKs drafting the next step's specs
    used: int  # slots whose logits are read; the rest is padding
    fallback: bool = False  # one fallback branch per spec follows the main chain
    tree: tuple[int, ...] = ()  # spec positions with a tree branch [alts[j], MASK * (n_drafts - 1)], after those

    @property
    def main(self) -> int:
        """Slots of the main chain: pending + specs + MASKs."""
        return 1 + self.n_specs + self.n_drafts

    @property
    def tree_start(self) -> int:
        """First slot of the tree branches."""
        return self.main + (self.n_specs * self.n_drafts if self.fallback else 0)

    def gate(self) -> torch.Tensor:
        """R-ISD adapter gate: 1 on every draft MASK (main chain and branches), 0 on clean slots (the
        pending token, specs, a tree branch's alternative) and padding."""
        g = torch.zeros(len(self.ids))
        g[1 + self.n_specs: self.used] = 1.0
        if self.tree:
            g[self.tree_start: self.used: self.n_drafts] = 0.0
        return g

    def split(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of the used slots (used, V) -> main chain (main, V), fallback (n_specs, n_drafts, V)."""
        fb = logits[self.main: self.tree_start].view(self.n_specs, self.n_drafts, -1) if self.fallback else None
        return logits[: self.main], fb

    def tree_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """(len(tree), n_drafts, V): each tree branch's logits (its alternative's slot first)."""
        if not self.tree:
            return None
        return logits[self.tree_start: self.used].view(len(self.tree), self.n_drafts, -1)

    def read(self, logits: torch.Tensor) -> WindowLogits:
        """Logits of the used slots (used, V), split into what ``isd_step`` reads."""
        main, fallback = self.split(logits)
        return WindowLogits(main, fallback, self.tree_logits(logits), self.tree)


def build_window(state: ISDState, n_drafts: int, fallback: bool, mask_id: int, pad_to: int = 0,
                 tree: int = 0) -> Window:
    """The window for ``state`` at stride n_drafts + 1 (spec §3.2): at most n_drafts of its specs are
    verified (a smaller stride than the one that drafted them drops the rest), then n_drafts MASKs,
    then with ``fallback`` one branch of n_drafts MASKs per spec, then up to ``tree`` tree branches
    (``ISDState.tree_positions``); padded with causal MASKs to ``pad_to`` slots if asked.
    n_drafts = 0 is an AR step: the window is the pending token alone."""
    st = state.truncated(n_drafts)
    specs = st.specs
    fallback = fallback and n_drafts > 0 and len(specs) > 0
    branches = st.tree_positions(tree) if n_drafts > 0 else ()
    offsets, seen = window_layout(len(specs), n_drafts, fallback, branches)
    used = len(offsets)
    ids = [state.pending] + specs + [mask_id] * (n_drafts + (len(specs) * n_drafts if fallback else 0))
    for j in branches:
        ids += [st.alts[j]] + [mask_id] * (n_drafts - 1)
    branched = used > 1 + len(specs) + n_drafts
    pad = max(0, pad_to - used)
    if pad:  # padding MASKs: causal, never read, gate off
        ids += [mask_id] * pad
        offsets += range(offsets[-1] + 1, offsets[-1] + 1 + pad)
        if branched:
            full = torch.ones(used + pad, used + pad, dtype=torch.bool).tril()
            full[:used, :used] = seen
            seen = full
    return Window(ids, offsets, seen if branched else None, len(specs), n_drafts, used, fallback, branches)


def propose(draft_logits: torch.Tensor, params: SamplingParams, sampling_mode: str,
            gen: torch.Generator | None, noise: KeyedNoise | None = None, index: int = 0,
            pending: int = 0, tree: bool = False) -> ISDState:
    """The next state: ``pending`` and drafts from MASK logits (k, V) predicting output indices
    index..index+k-1: argmax when greedy or in reference mode; keyed picks from q in coupled mode;
    else sampled from q. spec_q is what verification will divide by (None when greedy or coupled).
    With ``tree``, also each position's best other token and its value (``second_choices``)."""
    if len(draft_logits) == 0:
        return ISDState(pending)
    q = None
    if params.greedy:
        drafts = torch.argmax(draft_logits, dim=-1).tolist()
    elif sampling_mode == "reference":  # point-mass proposal, q = softmax(logits / T) (spec §3.4)
        q = torch.softmax(draft_logits.float() / params.temperature, dim=-1)
        drafts = torch.argmax(draft_logits, dim=-1).tolist()
    else:
        q = target_probs(draft_logits, params)
        drafts = keyed_argmax(q, _noise(noise).rows(index, len(q))) if sampling_mode == "coupled" else draw(q, gen).tolist()
    if not tree:
        return ISDState(pending, drafts, None if sampling_mode == "coupled" else q)
    probs = q if q is not None else torch.softmax(draft_logits.float(), dim=-1)
    alts, value = second_choices(probs, drafts)
    return ISDState(pending, drafts, None if sampling_mode == "coupled" else q, alts, value)


def second_choices(probs: torch.Tensor, drafts: list[int]) -> tuple[list[int], list[float]]:
    """For drafts[j] ~ probs[j]: the most probable other token at each position, and the estimated
    probability that a step reaches position j and corrects it to that token, prod_{i<j}
    probs[i, drafts[i]] * probs[j, alt_j] (the drafter's own belief; a tree branch's value)."""
    rows = torch.arange(len(drafts))
    idx = torch.tensor(drafts)
    p_draft = probs[rows, idx]
    other = probs.clone()
    other[rows, idx] = -1.0
    p_alt, alts = other.max(dim=-1)
    reach = torch.cumprod(torch.cat([torch.ones(1), p_draft[:-1].float()]), 0)
    return alts.tolist(), (reach * p_alt.float()).tolist()


def check_specs(anchor_logits: torch.Tensor, state: ISDState, params: SamplingParams, sampling_mode: str,
                gen: torch.Generator | None, noise: KeyedNoise | None = None, index: int = 0) -> Verdict:
    """Verify state.specs against anchor logits (len(specs), V); specs[0] is output index ``index``."""
    if params.greedy:
        return verify_greedy(anchor_logits, state.specs)
    if sampling_mode == "coupled":  # the anchor's own keyed pick is the truth; a draft passes if equal
        return verify_keyed(target_probs(anchor_logits, params), state.specs, _noise(noise).rows(index, len(state.specs)))
    if sampling_mode == "reference":  # reference verifies against the un-truncated p
        p = torch.softmax(anchor_logits.float() / params.temperature, dim=-1)
    else:
        p = target_probs(anchor_logits, params)
    return verify_sampled(p, state.spec_q, state.specs, gen)


def _noise(noise: KeyedNoise | None) -> KeyedNoise:
    if noise is None:
        raise ValueError("coupled sampling needs the request's KeyedNoise")
    return noise


def window_layout(n_specs: int, n_drafts: int, fallback: bool, tree: tuple[int, ...] = ()
                  ) -> tuple[list[int], torch.Tensor]:
    """Slots of one window: position offsets from the pending token, and the (T, T) mask of which
    window slots each slot sees. Main chain: pending, specs, N-1 MASKs (causal). Then, with
    ``fallback``, one branch of N-1 MASKs per spec j at offsets j+1.., seeing main slots 0..j and
    its own earlier slots; then one tree branch of N-1 slots per spec position in ``tree``, laid out
    and masked the same way. (Fresh copies of a cached layout: callers may extend them.)"""
    offsets, mask = _layout(n_specs, n_drafts, fallback, tuple(tree))
    return list(offsets), mask.clone()


@functools.lru_cache(maxsize=256)
def _layout(n_specs: int, n_drafts: int, fallback: bool, tree: tuple[int, ...]) -> tuple[tuple[int, ...], torch.Tensor]:
    main = 1 + n_specs + n_drafts
    branches = (list(range(n_specs)) if fallback else []) + list(tree)
    t = main + len(branches) * n_drafts
    offsets = list(range(main))
    mask = torch.zeros(t, t, dtype=torch.bool)
    mask[:main, :main] = torch.ones(main, main, dtype=torch.bool).tril()
    for b, j in enumerate(branches):
        base = main + b * n_drafts
        offsets += range(j + 1, j + 1 + n_drafts)
        mask[base: base + n_drafts, : j + 1] = True
        mask[base: base + n_drafts, base: base + n_drafts] = torch.ones(n_drafts, n_drafts, dtype=torch.bool).tril()
    return tuple(offsets), mask


def isd_step(logits: WindowLogits, state: ISDState, settings: StepSettings) -> StepResult:
    """Pure ISD step (spec §3.5-3.6): window logits -> what to emit, keep and do next.
    ``logits.main`` (>= 1 + s + n_drafts, V) anchors the s specs, then the clean slot and the MASKs;
    ``logits.fallback[j]`` drafts after a rejected specs[j]; ``logits.tree[b]`` is the tree branch of spec
    position ``logits.tree_at[b]``, used when that spec is rejected and the correction is its alternative.
    n_drafts = 0 is an AR step (no specs): emit the clean token, keep the pending slot."""
    st, s = settings, len(state.specs)
    verdict = check_specs(logits.main[:s], state, st.params, st.sampling_mode, st.gen, st.noise, st.index)
    if verdict.correction is not None:
        emitted, nxt, branch = _rejected(logits, state, st, verdict)
    else:
        noise = st.noise if st.sampling_mode == "coupled" else None
        clean = pick(logits.main[s: s + 1], st.params, st.gen, noise, st.index + s)[0]
        emitted = state.specs + [clean]
        nxt, branch = _propose_after(logits.main[s + 1: s + 1 + st.n_drafts], st, st.index + s + 1, clean), "main"
    verified = VerifyStep(s, verdict.accepted, len(logits.tree_at), branch == "tree")
    return StepResult(emitted, 1 + verdict.accepted, verdict, nxt, branch, verified)  # keep pending + accepted


def _rejected(logits: WindowLogits, state: ISDState, st: StepSettings, verdict: Verdict
              ) -> tuple[list[int], ISDState, str]:
    """A step whose spec j was rejected: emit specs[:j] + the correction (emitted, next state, branch),
    drafting next from the tree branch that began with the correction, else from fallback branch j,
    else cold."""
    j, c = verdict.accepted, verdict.correction
    emitted = state.specs[:j] + [c]
    if j in logits.tree_at and state.alts[j] == c:
        # the tree branch started with the correction: its clean slot drafts the next token exactly
        return emitted, _propose_after(logits.tree[logits.tree_at.index(j)], st, st.index + j + 1, c), "tree"
    if logits.fallback is None:
        return emitted, ISDState(c), "cold"
    return emitted, _propose_after(logits.fallback[j], st, st.index + j + 1, c), "fallback"


def _propose_after(draft_logits: torch.Tensor, st: StepSettings, index: int, pending: int) -> ISDState:
    """``propose`` with one request's settings: drafts for output indices index.. after ``pending``."""
    return propose(draft_logits, st.params, st.sampling_mode, st.gen, st.noise, index, pending, st.alternatives)


def randomness(params: SamplingParams, sampling_mode: str, vocab: int
               ) -> tuple[torch.Generator, KeyedNoise | None]:
    """A request's random sources: a generator (exact / reference modes) and, in coupled mode with
    T > 0, its keyed noise. Both derive from the seed (a fresh random one when it is None)."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    noise = KeyedNoise(seed, vocab) if sampling_mode == "coupled" and not params.greedy else None
    return make_generator(seed), noise


StepHook = Callable[[KVCache, list[int], ISDState | None], None]


@torch.inference_mode()
def isd_generate(model: Decoder, prompt: list[int], cfg: DecodeConfig, params: SamplingParams,
                 on_step: StepHook | None = None) -> DecodeResult:
    """Decode with ISD at stride cfg.stride. ``on_step(cache, tokens, state)`` runs after every
    step (tests check the KV invariants there)."""
    if not prompt:
        raise ValueError("empty prompt")
    if cfg.auto:
        raise ConfigError("--stride auto is chosen per step by the engine; the batch-1 decoder needs a number",
                          "stride")
    t_start = time.perf_counter()
    n_drafts, mask = cfg.n_drafts, cfg.mask_token_id if cfg.mask_token_id is not None else model.cfg.mask_token_id
    gen, noise = randomness(params, cfg.sampling_mode, model.cfg.vocab_size)
    stats = DecodeStats(stride=cfg.max_stride, prompt_tokens=len(prompt))
    stop = StopRule.of(params, model.cfg.eos_token_ids)
    tokens: list[int] = []  # the output so far (the stop rule extends it)
    cache = model.new_cache(capacity=len(prompt) + params.max_new_tokens + 2 * cfg.window)
    gated = model.has_adapters  # R-ISD: adapters act on draft MASK slots only, so the anchor is the base

    # 1. Prefill exactly as AR does; the first token comes from the last prompt slot. The first step
    #    is then a cold step [t0, MASK * (N-1)] that yields the clean token and the first drafts.
    p_len = len(prompt)
    hidden = model.hidden(torch.tensor(prompt), torch.arange(p_len), cache)[0]
    stats.forwards += 1
    state = ISDState(pick(model.logits(hidden[-1:]), params, gen, noise, 0)[0])
    finish = stop.extend(tokens, [state.pending])
    if on_step:
        on_step(cache, tokens, state)

    # 2. Steps: extend by a window, keep 1 + accepted, emit accepted + clean/correction.
    while finish is None:
        win = build_window(state, n_drafts, cfg.may_fallback, mask, cfg.window if cfg.pad_windows else 0, cfg.tree)
        start = cache.length
        hidden = model.hidden(torch.tensor(win.ids), start + torch.tensor(win.offsets), cache,
                              gate=win.gate() if gated else None, window_mask=win.mask)[0]
        drafts = torch.tensor(win.ids[: win.used]) == mask if model.draft_vocab is not None else None
        logits = model.logits(hidden[: win.used], drafts)
        stats.forwards += 1
        settings = StepSettings(n_drafts, params, cfg.sampling_mode, gen, noise, len(tokens), cfg.tree > 0)
        step = isd_step(win.read(logits), state, settings)
        stats.record(step.verified)
        cache.crop(start + step.kept)
        state = step.next_state
        finish = stop.extend(tokens, step.emitted)
        if noise is not None:
            noise.forget_before(len(tokens))
        if finish:  # tokens after a stop were dropped: drop their KV too, keeping the invariant exact
            cache.crop(min(cache.length, p_len + len(tokens) - 1))
        if on_step:
            on_step(cache, tokens, state)

    stats.tokens = len(tokens)
    stats.seconds = time.perf_counter() - t_start
    return DecodeResult(tokens, finish or "length", stats)


@torch.inference_mode()
def ar_generate(model: Decoder, prompt: list[int], params: SamplingParams,
                on_step: StepHook | None = None, sampling_mode: str = "exact") -> DecodeResult:
    """Plain autoregressive decoding of the same network: one token per forward. In coupled mode
    token k is the keyed pick of index k, so it equals coupled ISD's output token for token."""
    if not prompt:
        raise ValueError("empty prompt")
    t_start = time.perf_counter()
    gen, noise = randomness(params, sampling_mode, model.cfg.vocab_size)
    stats = DecodeStats(stride=1, prompt_tokens=len(prompt))
    stop = StopRule.of(params, model.cfg.eos_token_ids)
    tokens: list[int] = []  # the output so far (the stop rule extends it)
    cache = model.new_cache(capacity=len(prompt) + params.max_new_tokens + 1)
    hidden = model.hidden(torch.tensor(prompt), torch.arange(len(prompt)), cache)[0]
    tok = pick(model.logits(hidden[-1:]), params, gen, noise, 0)[0]
    stats.forwards += 1
    finish = stop.extend(tokens, [tok])
    while finish is None:
        if on_step:
            on_step(cache, tokens, None)
        start = cache.length
        hidden = model.hidden(torch.tensor([tok]), torch.tensor([start]), cache)[0]
        tok = pick(model.logits(hidden[-1:]), params, gen, noise, len(tokens))[0]
        stats.forwards += 1
        finish = stop.extend(tokens, [tok])
        if noise is not None:
            noise.forget_before(len(tokens))
    stats.tokens = len(tokens)
    stats.seconds = time.perf_counter() - t_start
    return DecodeResult(tokens, finish or "length", stats)
