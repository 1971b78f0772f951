"""Throughput and latency of any OpenAI-compatible server (ours, vLLM, llama-server) over HTTP.

A client keeps C streaming chat requests in flight and measures, per request, the time to the first
token (TTFT), the gaps between tokens (ITL: a chunk that brings k tokens counts its gap k times, at
gap / k each; idlm says how many tokens a chunk carries, other servers count one) and the total
latency; the run gives requests/s and output tokens/s. Against an idlm server it also reads the
engine's own throughput in the same run (generated tokens / time the engine spent in steps, from
/metrics), so ``http_vs_engine`` is what the HTTP layer costs, measured in one process. ``mode`` / ``stride`` are idlm's own request
fields; other servers ignore them."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class HttpRun:
    mode: str
    concurrency: int
    seconds: float = 0.0
    tokens: list[int] = field(default_factory=list)  # completion tokens per request (from usage)
    texts: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    errors: int = 0
    engine_tokens_per_s: float | None = None  # idlm only: tokens / time the server's engine spent in steps

    @property
    def output_tokens_per_s(self) -> float:
        return sum(self.tokens) / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict:
        return {"mode": self.mode, "concurrency": self.concurrency, "requests": len(self.tokens),
                "errors": self.errors, "requests_per_s": round(self.requests_per_s, 4),
                "output_tokens_per_s": round(self.output_tokens_per_s, 3),
                "ttft_p50_s": q(self.ttft, 0.5), "ttft_p99_s": q(self.ttft, 0.99),
                "itl_p50_s": q(self.itl, 0.5), "itl_p99_s": q(self.itl, 0.99),
                "latency_p50_s": q(self.latency, 0.5), "seconds": round(self.seconds, 3),
                "engine_tokens_per_s": None if self.engine_tokens_per_s is None else round(self.engine_tokens_per_s, 3),
                "http_vs_engine": None if not self.engine_tokens_per_s else
                round(self.output_tokens_per_s / self.engine_tokens_per_s, 4)}


def q(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, int(p * len(s)))], 5)


async def _one(client: httpx.AsyncClient, url: str, body: dict, run: HttpRun, i: int) -> None:
    t0 = time.perf_counter()
    last, first, text, usage = None, None, "", None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                run.errors += 1
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[6:])
                if msg.get("usage"):
                    usage = msg["usage"]
                for c in msg.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or ""
                    k = len((c.get("idlm") or {}).get("pieces", [])) or (1 if piece else 0)
                    if not k:
                        continue
                    now = time.perf_counter()
                    text += piece
                    if first is None:
                        first = now - t0
                    elif last is not None:
                        run.itl += [(now - last) / k] * k
                    last = now
    except httpx.HTTPError:
        run.errors += 1
        return
    run.latency.append(time.perf_counter() - t0)
    run.texts[i] = text
    run.tokens.append(usage["completion_tokens"] if usage else 0)
    if first is not None:
        run.ttft.append(first)


async def run_http(base: str, model: str, prompts: list[str], mode: str, stride: str, concurrency: int,
                   max_tokens: int, api_key: str | None = None) -> HttpRun:
    """Serve ``prompts`` (chat messages) with at most ``concurrency`` streams in flight."""
    run = HttpRun(mode, concurrency, texts=[""] * len(prompts))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base.rstrip("/") + "/v1/chat/completions"
    extra = {"mode": "ar"} if mode == "ar" else {"mode": "isd", "stride": int(stride) if stride.isdigit() else stride}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), headers=headers, limits=limits) as client:
        async def task(i: int, text: str) -> None:
            async with sem:
                body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
                        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
                await _one(client, url, body, run, i)

        before = await _engine_counters(client, base)
        t0 = time.perf_counter()
        await asyncio.gather(*[task(i, p) for i, p in enumerate(prompts)])
        run.seconds = time.perf_counter() - t0
        after = await _engine_counters(client, base)
    if before and after and after[1] > before[1]:
        run.engine_tokens_per_s = (after[0] - before[0]) / (after[1] - before[1])
    return run


async def _engine_counters(client: httpx.AsyncClient, base: str) -> tuple[float, float] | None:
    """(generated tokens, engine busy seconds) from an idlm server's /metrics; None for other servers."""
    try:
        r = await client.get(base.rstrip("/") + "/metrics")
    except httpx.HTTPError:
        return None
    vals = {}
    for line in r.text.splitlines():
        for name in ("idlm:generation_tokens_total", "idlm:engine_busy_seconds_total"):
            if line.startswith(name):
                vals[name] = float(line.rsplit(" ", 1)[1])
    if len(vals) < 2:
        return None
    return vals["idlm:generation_tokens_total"], vals["idlm:engine_busy_seconds_total"]


def server_model(base: str, api_key: str | None = None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(base.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]
