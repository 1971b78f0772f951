"""Generate a task's outputs, in process through the engine or against an OpenAI-compatible server.

Both paths give one ``Generation`` per example, in the examples' order, with the text cut before the
task's first stop string, and the wall time of the whole run, so the same scoring and reporting
code serves both. In process, at most ``concurrency`` requests are in the engine at once (the
engine batches them); a request whose text reaches a stop string is aborted at once, like a server
does, so no tokens are generated past it. Over HTTP, ``concurrency`` requests are in flight;
idlm's own ``mode`` / ``stride`` request fields are sent (other servers ignore them), and a failed
request is recorded with its error and scores 0, as the reference's evaluation scripts count it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from tqdm import tqdm

from ..config import DecodeConfig, SamplingParams
from ..text import IncrementalDetokenizer, StopStrings
from .prompts import encode
from .tasks import Example


@dataclass
class Generation:
    """One example's output."""

    id: str
    text: str  # cut before the first stop string
    tokens: int  # tokens the model generated for it (committed; a stop string may end mid-step)
    forwards: int | None  # model forwards it took part in (None when a server does not say)
    finish_reason: str  # stop | length | error
    seconds: float  # its latency
    error: str | None = None


@dataclass
class GenerationRun:
    generations: list[Generation]
    seconds: float  # wall time of the whole run

    @property
    def tokens(self) -> int:
        return sum(g.tokens for g in self.generations)

    @property
    def forwards(self) -> int | None:
        f = [g.forwards for g in self.generations]
        return None if any(x is None for x in f) else sum(f)

    @property
    def tpf(self) -> float | None:
        f = self.forwards
        return self.tokens / f if f else None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass
class _Live:
    index: int
    detok: IncrementalDetokenizer
    stops: StopStrings
    parts: list[str]


def generate_engine(engine, tokenizer, examples: list[Example], chat: bool, stop: tuple[str, ...],
                    params: SamplingParams, decode: DecodeConfig, concurrency: int,
                    progress: bool = True, desc: str = "eval") -> GenerationRun:
    """Run every example through ``engine`` with at most ``concurrency`` in flight."""
    prompts = [encode(tokenizer, ex.prompt, chat) for ex in examples]
    out: list[Generation | None] = [None] * len(examples)
    waiting = deque(range(len(examples)))
    live: dict[str, _Live] = {}
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, unit="ex", dynamic_ncols=True)
    t0 = time.perf_counter()

    def finish(rid: str, st: _Live, reason: str) -> None:
        done = engine.completion(rid)
        text = "".join(st.parts)
        out[st.index] = Generation(examples[st.index].id, text, len(done.token_ids), done.stats.forwards, reason,
                                   done.latency_s)
        del live[rid]
        bar.update(1)

    while waiting or live:
        while waiting and len(live) < concurrency:
            i = waiting.popleft()
            rid = engine.add_request(prompts[i], params, decode)
            live[rid] = _Live(i, IncrementalDetokenizer(tokenizer), StopStrings(stop), [])
        for res in engine.step():
            st = live.get(res.request_id)
            if st is None:  # an abort we asked for
                continue
            st.parts.append(st.stops.push(st.detok.push(res.new_token_ids)))
            if st.stops.matched is not None:
                engine.abort(res.request_id)
                finish(res.request_id, st, "stop")
                engine.drop_aborted()
                engine.release(res.request_id)
            elif res.finished:
                st.parts.append(st.stops.push(st.detok.flush()))
                st.parts.append(st.stops.flush())
                finish(res.request_id, st, res.finish_reason or "stop")
                engine.release(res.request_id)
    bar.close()
    return GenerationRun(out, time.perf_counter() - t0)  # type: ignore[arg-type]


def generate_server(url: str, model: str, examples: list[Example], chat: bool, stop: tuple[str, ...],
                    max_tokens: int, mode: str, stride: int | str, concurrency: int, api_key: str | None = None,
                    progress: bool = True, desc: str = "eval", timeout_s: float = 600.0) -> GenerationRun:
    """The same run against an OpenAI-compatible server: greedy, non-streaming, C in flight."""
    return asyncio.run(_server_run(url.rstrip("/"), model, examples, chat, stop, max_tokens, mode, stride,
                                   concurrency, api_key, progress, desc, timeout_s))


async def _server_run(url, model, examples, chat, stop, max_tokens, mode, stride, concurrency, api_key,
                      progress, desc, timeout_s) -> GenerationRun:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, unit="ex", dynamic_ncols=True)

    async def one(client: httpx.AsyncClient, ex: Example) -> Generation:
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "mode": mode}
        if mode == "isd":
            body["stride"] = stride
        if stop:
            body["stop"] = list(stop)
        if chat:
            route, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": ex.prompt}]
        else:
            route, body["prompt"] = "/v1/completions", ex.prompt
        async with sem:
            t = time.perf_counter()
            try:
                r = await client.post(url + route, json=body, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                data = r.json()
                ch = data["choices"][0]
                text = ch["message"]["content"] if chat else ch["text"]
                extra = ch.get("idlm") or {}
                gen = Generation(ex.id, text or "", int(data.get("usage", {}).get("completion_tokens", 0)),
                                 extra.get("forwards"), ch.get("finish_reason") or "stop", time.perf_counter() - t)
            except (httpx.HTTPError, RuntimeError, KeyError, ValueError, TypeError) as e:
                gen = Generation(ex.id, "", 0, None, "error", time.perf_counter() - t, f"{type(e).__name__}: {e}")
        bar.update(1)
        return gen

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        gens = await asyncio.gather(*(one(client, ex) for ex in examples))
    bar.close()
    return GenerationRun(list(gens), time.perf_counter() - t0)
