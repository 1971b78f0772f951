"""A request inside the engine (token ids only) and what the engine reports about it.

A request's committed text is ``prompt + output[:-1]``: the last output token (ISD's pending token)
is emitted before its K/V exists. ``num_computed`` counts the committed tokens whose K/V is in the
pool; it is *set* after every forward from what that forward verified, never incremented.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from ..config import DecodeConfig, SamplingParams
from ..decode import ISDState, KeyedNoise, StepSettings, StopRule
from ..metrics import DecodeStats


class Status(enum.Enum):
    WAITING = "waiting"  # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"  # holds KV blocks: prefilling or decoding
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one emitted token under the model (raw logits, before temperature)."""

    token_id: int  # the emitted token
    logprob: float  # its log-probability
    top: tuple[tuple[int, float], ...]  # the most likely alternatives: (token id, log-probability)


@dataclass(frozen=True)
class RequestOutput:
    """What one engine step did for one request."""

    request_id: str
    new_token_ids: list[int]  # tokens committed this step (in order; none after a stop)
    finished: bool
    finish_reason: str | None  # "stop" (EOS / stop id), "length" (max tokens), "abort"; None while running
    num_prompt_tokens: int
    num_output_tokens: int  # output tokens so far, new ones included
    logprobs: list[TokenLogprob] | None = None  # one per new token when the request asked for them
    stats: DecodeStats | None = None  # the request's counters (set when it finishes)
    drafted: list[bool] | None = None  # per new token: True = an accepted draft, False = the anchor's own token
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first tokens, if asked: one per prompt
    # token (None for the first, which nothing predicts)


@dataclass
class Completion:
    """A finished request, as ``LLMEngine.generate`` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    stats: DecodeStats
    logprobs: list[TokenLogprob] | None = None
    latency_s: float = 0.0  # from add_request to the last token
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Stopper:
    """A request's output tokens and finish reason, extended step by step under its ``StopRule``."""

    def __init__(self, params: SamplingParams, eos_ids: tuple[int, ...]):
        self.rule = StopRule.of(params, eos_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None

    def push(self, emitted: list[int]) -> bool:
        """Append; return True when finished (tokens after the finishing one are dropped)."""
        reason = self.rule.extend(self.tokens, emitted)
        if reason is not None:
            self.finish_reason = reason
        return reason is not None


@dataclass(eq=False)
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    decode: DecodeConfig
    arrival: int  # order of arrival: the newest running request is preempted first
    gen: torch.Generator  # exact / reference sampling randomness (consumed in order)
    noise: KeyedNoise | None  # coupled sampling randomness (keyed by output index)
    stopper: Stopper  # output tokens and the stop rule
    stats: DecodeStats
    status: Status = Status.WAITING
    num_computed: int = 0  # committed tokens whose K/V is in the pool
    state: ISDState | None = None  # pending token and drafts; None until the first token exists
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # filled by the first prefill, chunk by chunk
    finish_reason: str | None = None
    times: dict[str, float] = field(default_factory=lambda: {"added": time.perf_counter()})

    @property
    def output(self) -> list[int]:
        return self.stopper.tokens

    def step_settings(self, n_drafts: int) -> StepSettings:
        """This request's settings for a decode step drafting ``n_drafts`` tokens (the step's first
        spec is output index len(output): the pending token is the last output token)."""
        return StepSettings(n_drafts, self.params, self.decode.sampling_mode, self.gen, self.noise,
                            len(self.output), self.decode.tree > 0)

    @property
    def committed_len(self) -> int:
        """Tokens that must have K/V before the next decode step: the prompt, plus every output
        token except the pending (last) one."""
        return len(self.prompt) + max(0, len(self.output) - 1)

    @property
    def adaptive(self) -> bool:
        """The engine may choose this request's window each step: it asked for auto stride or
        fallback, and no choice can change its tokens (greedy, or coupled sampling, whose randomness
        is keyed by output index). Exact / reference sampling draws its randomness in window order,
        so a seeded request there keeps one fixed window (its stride, fallback on) in any batch."""
        return self.decode.adaptive and (self.params.greedy or self.decode.sampling_mode == "coupled")

    @property
    def scores_prompt(self) -> bool:
        """The first prefill must read every prompt row's logits (prompt logprobs asked, not done)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.committed_len

    def committed_tokens(self, start: int, end: int) -> list[int]:
        """Ids of committed text positions [start, end) (prompt, then output)."""
        p = len(self.prompt)
        if end <= p:
            return self.prompt[start:end]
        return self.prompt[start:] + self.output[max(0, start - p): end - p] if start < p else \
            self.output[start - p: end - p]
