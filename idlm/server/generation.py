"""One choice of a request: engine outputs (token ids) → text deltas the client may see.

Per choice: incremental detokenization (never a broken UTF-8 character), text-level stop strings
(cut exactly, even across deltas; only a tail that could still begin a stop string is held back),
per-token logprobs and how each token was committed (an accepted draft or the anchor's own token).
ISD commits only verified tokens, so nothing streamed is ever retracted. A stop string ends the
choice: the engine request is aborted and its KV freed at once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..config import DecodeConfig, SamplingParams
from ..engine import AsyncEngine, TokenLogprob
from ..metrics import DecodeStats
from ..text import IncrementalDetokenizer, StopStrings


@dataclass
class Delta:
    """What one engine step added to a choice."""

    text: str  # new visible text (may be empty while text is held back)
    token_ids: list[int]  # tokens committed this step (up to the stop)
    logprobs: list[TokenLogprob]  # one per token, when asked
    drafted: list[bool]  # per token: an accepted draft (True) or the anchor's own token
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last delta
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    stats: DecodeStats | None = None  # on the last delta


@dataclass
class ChoiceResult:
    """A choice's deltas, accumulated (the non-streaming body; usage when streaming)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    drafted: list[bool] = field(default_factory=list)
    finish_reason: str = "abort"
    stop_reason: str | int | None = None
    stats: DecodeStats | None = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.token_ids += d.token_ids
        self.logprobs += d.logprobs
        self.drafted += d.drafted
        if d.finish_reason is not None:
            self.finish_reason, self.stop_reason, self.stats = d.finish_reason, d.stop_reason, d.stats


class Timing:
    """Latency observations of one choice, for the server's histograms."""

    def __init__(self, start: float):
        self.start, self.last, self.first = start, None, None
        self.gaps: list[float] = []  # inter-token latency, one per token after the first

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        if n <= 0:
            return
        if self.first is None:
            self.first = now - self.start
            n -= 1
        elif self.last is not None:
            self.gaps += [(now - self.last) / n] * n
            n = 0
        if n:
            self.gaps += [0.0] * n
        self.last = now


async def run_choice(engine: AsyncEngine, tokenizer, request_id: str, prompt_ids: list[int],
                     params: SamplingParams, decode: DecodeConfig, stops: tuple[str, ...],
                     timing: Timing | None = None, prompt_logprobs_sink: list | None = None
                     ) -> AsyncIterator[Delta]:
    """Yield the choice's deltas; the last has ``finish_reason``. Leaving early aborts the request."""
    detok = IncrementalDetokenizer(tokenizer)
    stopper = StopStrings(stops)
    agen = engine.generate(prompt_ids, params, decode, request_id)
    stopped = False
    try:
        async for out in agen:
            if out.prompt_logprobs is not None and prompt_logprobs_sink is not None:
                prompt_logprobs_sink[:] = out.prompt_logprobs
            if stopped:  # waiting for the abort to come back with the stats
                if out.finished:
                    yield Delta("", [], [], [], "stop", stopper.matched, out.stats)
                    return
                continue
            text, keep = visible_text(detok, stopper, out.new_token_ids, out.finished)
            ids, lps, drafted = out.new_token_ids[:keep], (out.logprobs or [])[:keep], (out.drafted or [])[:keep]
            if timing is not None:
                timing.tokens(len(ids))
            if stopper.matched is not None:
                stopped = True
                engine.abort(request_id)
                if out.finished:
                    yield Delta(text, ids, lps, drafted, "stop", stopper.matched, out.stats)
                    return
                yield Delta(text, ids, lps, drafted)
                continue
            if out.finished:
                text += stopper.flush()
                reason = out.finish_reason or "stop"
                stop_reason = ids[-1] if reason == "stop" and ids and ids[-1] in params.stop_token_ids else None
                yield Delta(text, ids, lps, drafted, reason, stop_reason, out.stats)
                return
            yield Delta(text, ids, lps, drafted)
    finally:
        await agen.aclose()


def visible_text(detok: IncrementalDetokenizer, stopper: StopStrings, ids: list[int], finished: bool
                 ) -> tuple[str, int]:
    """The text that ``ids`` (one engine step's tokens) make visible, and how many of them belong to
    the output. With stop strings the tokens are detokenized one at a time, so that a stop string
    completed by one of them also ends the tokens (usage, logprobs) there: ISD commits several tokens
    per step, and those after the stop string are not part of the output."""
    if not stopper.stops or len(ids) <= 1:
        return stopper.push(detok.push(ids) + (detok.flush() if finished else "")), len(ids)
    text = ""
    for k, t in enumerate(ids):
        last = k == len(ids) - 1
        text += stopper.push(detok.push([t]) + (detok.flush() if finished and last else ""))
        if stopper.matched is not None:
            return text, k + 1
    return text, len(ids)


async def collect(deltas: AsyncIterator[Delta], result: ChoiceResult) -> ChoiceResult:
    async for d in deltas:
        result.add(d)
    return result
