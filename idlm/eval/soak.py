"""Soak test for ``idlm serve``: a real server under minutes of mixed HTTP load, then leak checks.

``python -m idlm.eval.soak --minutes 3`` (or ``make soak MINUTES=3``) starts ``idlm serve`` as a
subprocess on a free loopback port, warms it up with one pass over every kind of request, and then lets
a few concurrent clients drive a random mix for the given time:

- chat and completions, streamed (with ``stream_options.include_usage``) and plain;
- ``n > 1`` (plain and streamed), ``logprobs`` / ``top_logprobs``, stop strings;
- echo scoring (completions with ``echo``, ``logprobs`` and ``max_tokens`` 0 or 1, as lm-eval sends);
- a prompt just under the context limit (read from ``/v1/models``) and one just over it (must be a 400
  with code ``context_length_exceeded``);
- clients that hang up on purpose: a stream closed after a few chunks or before its first byte, a plain
  request given up early.

Every response is checked: status, error shape, usage, one finish per choice, ``[DONE]``, a stop
string never in the text and the tokens (usage, logprobs) ending with the one that completes it, and
reproducibility (greedy and seeded requests with the same prompt give the same text, up to where
stop strings or ``max_tokens`` cut it, whatever else the batch held). The server process's RSS and
thread count (``/proc/<pid>/status``) are sampled after the warm-up (start), half way through the load
(middle), at every bucket's end, and after all clients stopped and a short settle (end); ``/metrics``
is read at the end, and one request then asks for every admission slot (n = running + queue). Output
tokens per second come from the responses' ``usage``, each answer's tokens spread over its lifetime,
per time bucket. The report is a table, then one JSON line (also written to ``--out``).

Targets (exit status 1 if any fails; 2 if the server does not start or dies): no 5xx; no unexpected
status; no dropped connection or other client error that was not a deliberate hang-up; no malformed
response; RSS at the end at most 10 % above the middle; threads at the end at most 2 above the
middle; no KV blocks in use and no request running or waiting at the end; every admission slot free
at the end; the server exits 0 on SIGTERM. The server is always stopped (also on Ctrl-C / SIGTERM).

The server runs with --max-model-len 1024 by default, so that a near-limit prompt costs seconds, not
minutes, on a small CPU (``--max-model-len 0`` keeps the model's own context).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

RSS_SLACK = 0.10  # RSS at the end may exceed the middle by this fraction
THREAD_SLACK = 2  # threads at the end may exceed the middle by this many
MAX_CHOICES = 3  # the largest n a client asks for
REQUEST_TIMEOUT_S = 600.0  # a request that takes longer is a failure (client-side timeout)
CHAT_PROMPTS = (
    "What is 12 * 7?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "Explain what a prime number is, briefly.",
    "List the days of the week.",
    "Give me a short tip for learning to cook.",
)
TEXT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):\n",
    "Question: What is 3 + 4?\nAnswer:",
    "The three primary colours are",
)
STOPS = ((".",), ("\n",), (",", "."), (" the", "\n\n"), ("!", "?", "."), ("e",), ("o", "a"))
SEEDS = (1, 2, 3)
FILLER = "The quick brown fox jumps over the lazy dog while the sun sets behind the quiet hills. "


# -- configuration ---------------------------------------------------------------------------------

@dataclass
class SoakConfig:
    minutes: float = 3.0  # load duration (after the warm-up)
    clients: int = 4  # concurrent clients
    bucket_s: float = 30.0  # width of a tok/s time bucket
    seed: int = 0  # the clients' random choices
    model: str | None = None  # --model for idlm serve (None: the default model)
    max_model_len: int | None = 1024  # --max-model-len for idlm serve (None: the model's own context)
    max_running: int = 4  # --max-running for idlm serve
    max_queue: int = 12  # --max-queue for idlm serve (running + queue = 16 = the largest n, for the end probe)
    threads: int | None = None  # --threads for idlm serve (None: all cores)
    serve_args: tuple[str, ...] = ()  # more `idlm serve` arguments
    settle_s: float = 10.0  # after the load: wait at most this long for running / KV gauges to reach 0
    start_timeout_s: float = 900.0  # model load (a first run converts the default model)
    server_log: str | None = None  # where the server's output goes (default: a temporary file)
    verbose: bool = True  # progress lines on stderr

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0


# -- the report ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    """One request as a client saw it."""

    scenario: str
    status: int | None = None  # HTTP status; None when no response came
    expected_status: int = 200
    completion_tokens: int = 0
    prompt_tokens: int = 0
    hangup: bool = False  # the client closed the connection on purpose
    exception: str | None = None  # a client-side error that was not a deliberate hang-up
    problem: str | None = None  # the response failed a check
    end_s: float = 0.0  # when it ended, seconds from the start of the load (warm-up: negative)
    latency_s: float = 0.0  # from sending to the last byte read (or the hang-up)

    @property
    def unexpected_status(self) -> bool:
        return self.status is not None and self.status != self.expected_status


@dataclass
class ProcSample:
    label: str  # start | middle | end, or t+S for the periodic samples
    t_s: float  # seconds from the start of the load
    rss_mb: float
    threads: int


@dataclass
class Bucket:
    start_s: float
    end_s: float
    requests: int  # answered in the bucket (2xx)
    completion_tokens: int  # output tokens produced in the bucket (each answer's spread over its lifetime)
    tok_per_s: float
    rss_mb: float | None = None  # the server's RSS at the end of the bucket
    threads: int | None = None


@dataclass
class ScenarioStats:
    requests: int = 0
    served: int = 0  # 2xx
    hangups: int = 0
    latency_p50_s: float = 0.0
    latency_max_s: float = 0.0


@dataclass
class EndState:
    """What ``/metrics`` says after the load and the settle."""

    kv_cache_usage_perc: float | None = None
    kv_blocks_in_use: int | None = None  # from a block-count gauge, where the server exports one
    running: float | None = None
    waiting: float | None = None
    client_disconnects: float | None = None  # the server's count of requests whose client went away
    settle_s: float = 0.0  # how long the gauges took to reach 0 (or the settle limit)
    capacity_probe: int | None = None  # status of one request asking for every admission slot (n = the cap)
    capacity_probe_n: int = 0


@dataclass
class Target:
    name: str
    ok: bool
    detail: str


@dataclass
class SoakReport:
    minutes: float
    clients: int
    model: str
    max_model_len: int
    load_s: float  # the load phase, first request to last answer
    requests: int  # all requests sent (warm-up included)
    served: int  # answered 2xx
    hangups: int  # deliberate hang-ups
    expected_errors: int  # 4xx the scenario asked for (prompt over the context)
    completion_tokens: int
    scenarios: dict[str, ScenarioStats]
    status_counts: dict[str, int]  # every HTTP status seen
    errors_by_code: dict[str, int]  # statuses the scenario did not expect
    client_exceptions: dict[str, int]  # client-side errors other than deliberate hang-ups, by type
    invalid_responses: int
    invalid_examples: list[str]
    samples: list[ProcSample]
    end: EndState
    buckets: list[Bucket]
    server_exit_code: int | None = None
    targets: list[Target] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.targets) and all(t.ok for t in self.targets)

    def sample(self, label: str) -> ProcSample | None:
        return next((s for s in self.samples if s.label == label), None)

    def to_json(self) -> dict:
        d = asdict(self)
        d["passed"] = self.passed
        return d


# -- pure helpers ----------------------------------------------------------------------------------

def parse_proc_status(text: str) -> tuple[float, int]:
    """(RSS in MiB, thread count) from the text of ``/proc/<pid>/status``."""
    rss_kb, threads = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            rss_kb = int(value.split()[0])
        elif key == "Threads":
            threads = int(value.split()[0])
    if rss_kb is None or threads is None:
        raise ValueError("no VmRSS / Threads in the process status")
    return rss_kb / 1024.0, threads


def parse_prometheus(text: str) -> dict[str, float]:
    """Samples of a Prometheus text exposition as {name: value}, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def end_state(metrics: dict[str, float], settle_s: float = 0.0) -> EndState:
    """The KV / scheduler gauges of an idlm server, read from parsed ``/metrics``."""
    blocks = next((v for k, v in metrics.items() if "kv" in k and "block" in k
                   and any(w in k for w in ("used", "in_use", "usage")) and not k.endswith("_created")), None)
    return EndState(kv_cache_usage_perc=metrics.get("idlm:kv_cache_usage_perc"),
                    kv_blocks_in_use=None if blocks is None else int(blocks),
                    running=metrics.get("idlm:num_requests_running"),
                    waiting=metrics.get("idlm:num_requests_waiting"),
                    client_disconnects=metrics.get("idlm:http_requests_client_disconnected_total"),
                    settle_s=settle_s)


def is_idle(e: EndState) -> bool:
    return (e.kv_cache_usage_perc == 0 and e.running == 0 and e.waiting == 0
            and (e.kv_blocks_in_use is None or e.kv_blocks_in_use == 0))


def bucketize(outcomes: list[Outcome], bucket_s: float, load_s: float,
              samples: list[ProcSample] = ()) -> list[Bucket]:
    """Per ``bucket_s`` of the load: requests answered (by when they ended) and output tokens, each
    answer's tokens spread evenly over its lifetime (so a bucket's tok/s is what the server produced
    in it, and the short last bucket is not inflated by long requests that end in it). Warm-up
    requests (negative times) are left out. Each bucket gets the last process sample taken by its end."""
    if load_s <= 0 or bucket_s <= 0:
        return []
    n = max(1, math.ceil(load_s / bucket_s - 1e-9))
    edges = [(i * bucket_s, min(load_s, (i + 1) * bucket_s)) for i in range(n)]
    answered, tokens = [0] * n, [0.0] * n
    for o in outcomes:
        if o.end_s < 0 or o.status is None or not 200 <= o.status < 300:
            continue
        answered[min(n - 1, int(o.end_s // bucket_s))] += 1
        lo, hi = max(0.0, o.end_s - o.latency_s), min(load_s, o.end_s)
        if hi <= lo:  # an instant answer: all in its bucket
            tokens[min(n - 1, int(hi // bucket_s))] += o.completion_tokens
            continue
        for i, (a, b) in enumerate(edges):
            if b > lo and a < hi:
                tokens[i] += o.completion_tokens * (min(b, hi) - max(a, lo)) / (hi - lo)
    buckets = []
    for i, (a, b) in enumerate(edges):
        seen = [x for x in samples if x.t_s <= b + 0.5]
        last = max(seen, key=lambda x: x.t_s) if seen else None
        buckets.append(Bucket(round(a, 1), round(b, 1), answered[i], round(tokens[i]),
                              round(tokens[i] / (b - a), 2) if b > a else 0.0,
                              last.rss_mb if last else None, last.threads if last else None))
    return buckets


def evaluate_targets(r: SoakReport, rss_slack: float = RSS_SLACK, thread_slack: int = THREAD_SLACK) -> list[Target]:
    """The pass / fail checks of a finished soak."""
    five = {k: v for k, v in r.errors_by_code.items() if k.startswith("5")}
    other = {k: v for k, v in r.errors_by_code.items() if not k.startswith("5")}
    mid, end = r.sample("middle"), r.sample("end")
    t = [
        Target("requests served", r.served > 0, f"{r.served} answered of {r.requests}"),
        Target("no 5xx", not five, json.dumps(five) if five else "none"),
        Target("no unexpected status", not other, json.dumps(other) if other else "none"),
        Target("no dropped connections", not r.client_exceptions,
               json.dumps(r.client_exceptions) if r.client_exceptions else f"none ({r.hangups} deliberate hang-ups)"),
        Target("responses well formed", r.invalid_responses == 0,
               f"{r.invalid_responses} bad" + (f": {r.invalid_examples[0]}" if r.invalid_examples else "")),
    ]
    if mid is None or end is None:
        t.append(Target("process sampled", False, "no middle or end sample"))
    else:
        limit = mid.rss_mb * (1 + rss_slack)
        t.append(Target(f"RSS end <= middle + {rss_slack:.0%}", end.rss_mb <= limit,
                        f"{end.rss_mb:.1f} MiB vs {mid.rss_mb:.1f} MiB (limit {limit:.1f})"))
        t.append(Target(f"threads end <= middle + {thread_slack}", end.threads <= mid.threads + thread_slack,
                        f"{end.threads} vs {mid.threads}"))
    e = r.end
    blocks = e.kv_blocks_in_use if e.kv_blocks_in_use is not None else (
        None if e.kv_cache_usage_perc is None else 0 if e.kv_cache_usage_perc == 0 else -1)
    t.append(Target("KV blocks in use at end == 0", blocks == 0 and e.running == 0 and e.waiting == 0,
                    f"kv_cache_usage_perc={e.kv_cache_usage_perc} blocks={e.kv_blocks_in_use} "
                    f"running={e.running} waiting={e.waiting}"))
    t.append(Target("admission slots free at end", e.capacity_probe == 200,
                    f"n={e.capacity_probe_n} request answered {e.capacity_probe}"))
    t.append(Target("server exits 0 on SIGTERM", r.server_exit_code == 0, f"exit code {r.server_exit_code}"))
    return t


def scenario_stats(outcomes: list[Outcome]) -> dict[str, ScenarioStats]:
    """Requests, answers, hang-ups and latency (p50, max) per scenario."""
    out: dict[str, ScenarioStats] = {}
    for name in sorted({o.scenario for o in outcomes}):
        mine = [o for o in outcomes if o.scenario == name]
        lat = sorted(o.latency_s for o in mine)
        out[name] = ScenarioStats(len(mine), sum(1 for o in mine if o.status is not None and 200 <= o.status < 300),
                                  sum(o.hangup for o in mine), round(lat[len(lat) // 2], 3), round(lat[-1], 3))
    return out


def summarize(outcomes: list[Outcome]) -> dict:
    """Counts over all outcomes: the report's request fields."""
    statuses = Counter(str(o.status) for o in outcomes if o.status is not None)
    errors = Counter(str(o.status) for o in outcomes if o.unexpected_status)
    problems = [f"{o.scenario}: {o.problem}" for o in outcomes if o.problem]
    return {
        "requests": len(outcomes),
        "served": sum(1 for o in outcomes if o.status is not None and 200 <= o.status < 300),
        "hangups": sum(o.hangup for o in outcomes),
        "expected_errors": sum(1 for o in outcomes if o.status == o.expected_status and o.status >= 400),
        "completion_tokens": sum(o.completion_tokens for o in outcomes if o.end_s >= 0),
        "scenarios": scenario_stats(outcomes),
        "status_counts": dict(sorted(statuses.items())),
        "errors_by_code": dict(sorted(errors.items())),
        "client_exceptions": dict(sorted(Counter(o.exception for o in outcomes if o.exception).items())),
        "invalid_responses": len(problems),
        "invalid_examples": problems[:10],
    }


# -- the server process ----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(cfg: SoakConfig, msg: str) -> None:
    if cfg.verbose:
        print(f"soak: {msg}", file=sys.stderr, flush=True)


class ServerProcess:
    """``idlm serve`` in its own session (a terminal's Ctrl-C reaches only us; we stop it)."""

    def __init__(self, cfg: SoakConfig):
        self.cfg = cfg
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if cfg.server_log:
            self.log_path = Path(cfg.server_log)
        else:
            fd, name = tempfile.mkstemp(prefix="idlm-soak-serve-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        c = self.cfg
        args = [sys.executable, "-m", "idlm.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--max-running", str(c.max_running), "--max-queue", str(c.max_queue), "--shutdown-timeout", "10"]
        if c.model:
            args += ["--model", c.model]
        if c.max_model_len:
            args += ["--max-model-len", str(c.max_model_len)]
        if c.threads:
            args += ["--threads", str(c.threads)]
        return args + list(c.serve_args)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with self.log_path.open("w") as out:
            self.proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log(self.cfg, f"started idlm serve (pid {self.proc.pid}) at {self.url}; log {self.log_path}")
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"idlm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"idlm serve not healthy after {self.cfg.start_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (a graceful drain), then SIGKILL if it does not exit in 60 s; the exit code."""
        p = self.proc
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        return p.returncode

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def sample_process(pid: int, label: str, t_s: float) -> ProcSample:
    rss, threads = parse_proc_status(Path(f"/proc/{pid}/status").read_text())
    return ProcSample(label, round(t_s, 1), round(rss, 1), threads)


# -- the clients -----------------------------------------------------------------------------------

@dataclass
class Context:
    """What every scenario needs: the server, its limits, and shared state."""

    client: httpx.AsyncClient
    url: str
    model: str
    max_model_len: int
    filler_ids: list[int]
    t0: float  # start of the load (time.monotonic)
    long_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # at most one near-limit prompt at a time
    texts: dict[str, str] = field(default_factory=dict)  # the longest text seen per reproducible request

    def now(self) -> float:
        return time.monotonic() - self.t0

    def same_text(self, route: str, body: dict, text: str) -> str | None:
        """Greedy and seeded requests are reproducible: whatever else is in the batch, whatever stride
        the load picks, the same prompt and sampling settings give the same text, up to where stop
        strings or max_tokens cut it. So of two such texts one must be a prefix of the other."""
        if body.get("temperature") != 0 and body.get("seed") is None:
            return None
        key = json.dumps([route, body.get("messages") or body.get("prompt"), body.get("temperature"),
                          body.get("top_p"), body.get("seed")])
        new, old = text.rstrip("\ufffd"), self.texts.get(key, "")
        if new.startswith(old):
            self.texts[key] = new
        elif not old.startswith(new):
            return f"same request, different text: {new[:60]!r} vs {old[:60]!r}"
        return None

    def prompt_ids(self, n: int) -> list[int]:
        reps = n // len(self.filler_ids) + 1
        return (self.filler_ids * reps)[:n]


Scenario = Callable[[Context, random.Random], Awaitable[Outcome]]


def _finish(o: Outcome, ctx: Context) -> Outcome:
    o.end_s = round(ctx.now(), 3)
    return o


def _check_usage(body: dict, o: Outcome) -> dict | None:
    u = body.get("usage")
    if not isinstance(u, dict) or u.get("total_tokens") != u.get("prompt_tokens", 0) + u.get("completion_tokens", 0):
        o.problem = f"bad usage: {u}"
        return None
    o.prompt_tokens, o.completion_tokens = u["prompt_tokens"], u["completion_tokens"]
    return u


def _sampling(rng: random.Random) -> dict:
    """Greedy, seeded sampling (a few seeds, so that requests repeat), or unseeded sampling."""
    r = rng.random()
    if r < 0.5:
        return {"temperature": 0}
    return {"temperature": 0.8, "top_p": 0.95, "seed": rng.choice(SEEDS) if r < 0.75 else None}


async def _post(ctx: Context, route: str, body: dict, o: Outcome) -> dict | None:
    """A plain request: the JSON body of a 2xx (None otherwise; the outcome says why)."""
    try:
        r = await ctx.client.post(ctx.url + route, json={"model": ctx.model, **body})
    except httpx.HTTPError as e:
        o.exception = type(e).__name__
        return None
    o.status = r.status_code
    try:
        data = r.json()
    except ValueError:
        o.problem = f"{r.status_code} with a body that is not JSON: {r.text[:80]!r}"
        return None
    if r.status_code != 200:
        err = data.get("error") if isinstance(data, dict) else None
        if not isinstance(err, dict) or "message" not in err:
            o.problem = f"{r.status_code} without the OpenAI error shape"
        return data if r.status_code == o.expected_status else None
    return data


async def _stream(ctx: Context, route: str, body: dict, o: Outcome, hang_after: int | None = None) -> list[dict] | None:
    """A streamed request: its data chunks, checked to end with [DONE]. With ``hang_after`` the
    client closes the connection after that many chunks (a deliberate hang-up; None is returned)."""
    chunks: list[dict] = []
    try:
        async with ctx.client.stream("POST", ctx.url + route, json={"model": ctx.model, **body, "stream": True}) as r:
            o.status = r.status_code
            if r.status_code != 200:
                await r.aread()
                return None
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                if done:
                    o.problem = "data after [DONE]"
                    return None
                msg = json.loads(line[6:])
                if "error" in msg:
                    o.problem = f"error chunk: {str(msg['error'])[:160]}"
                    return None
                chunks.append(msg)
                if hang_after is not None and len(chunks) >= hang_after:
                    o.hangup = True
                    return None  # leaving the block closes the connection mid-stream
            if not done:
                o.problem = "stream ended without [DONE]"
                return None
    except httpx.HTTPError as e:
        o.exception = type(e).__name__
        return None
    except ValueError as e:
        o.problem = f"a chunk is not JSON: {e}"
        return None
    return chunks


def _stream_choices(chunks: list[dict], kind: str, o: Outcome, usage: bool = True) -> dict[int, str] | None:
    """Joined text per choice index; each index must finish exactly once; with ``usage``, the last
    chunk carries the usage and no choices."""
    texts: dict[int, str] = {}
    finishes: Counter = Counter()
    for c in chunks:
        for ch in c.get("choices", []):
            i = ch["index"]
            piece = (ch.get("delta") or {}).get("content") if kind == "chat" else ch.get("text")
            texts[i] = texts.get(i, "") + (piece or "")
            if ch.get("finish_reason") is not None:
                finishes[i] += 1
    if usage and (not chunks or chunks[-1].get("choices") != [] or _check_usage(chunks[-1], o) is None):
        o.problem = o.problem or "no usage chunk (choices == []) at the end"
        return None
    if any(v != 1 for v in finishes.values()) or set(finishes) != set(texts):
        o.problem = f"finish reasons per index: {dict(finishes)}"
        return None
    return texts


def _no_stop_in(texts: list[str], stops: tuple[str, ...], o: Outcome) -> None:
    for t in texts:
        for s in stops:
            if s in t:
                o.problem = f"stop string {s!r} in the text {t[-60:]!r}"
                return


async def chat_stream(ctx: Context, rng: random.Random) -> Outcome:
    """Streamed chat, sometimes with stop strings."""
    o = Outcome("chat_stream")
    stops = rng.choice(STOPS) if rng.random() < 0.4 else ()
    body = {"messages": [{"role": "user", "content": rng.choice(CHAT_PROMPTS)}], "max_tokens": rng.randint(8, 48),
            "stream_options": {"include_usage": True}, **_sampling(rng), **({"stop": list(stops)} if stops else {})}
    chunks = await _stream(ctx, "/v1/chat/completions", body, o)
    if chunks is not None:
        texts = _stream_choices(chunks, "chat", o)
        if texts is not None:
            _no_stop_in(list(texts.values()), stops, o)
            o.problem = o.problem or ctx.same_text("chat", body, texts.get(0, ""))
    return _finish(o, ctx)


async def chat_plain(ctx: Context, rng: random.Random) -> Outcome:
    """Plain chat, half the time with logprobs (one entry per output token)."""
    o = Outcome("chat_plain")
    lps = rng.random() < 0.5
    body = {"messages": [{"role": "user", "content": rng.choice(CHAT_PROMPTS)}], "max_tokens": rng.randint(8, 48),
            **_sampling(rng), **({"logprobs": True, "top_logprobs": 2} if lps else {})}
    data = await _post(ctx, "/v1/chat/completions", body, o)
    if data is not None and _check_usage(data, o) is not None:
        ch = data["choices"]
        if len(ch) != 1 or not isinstance(ch[0]["message"]["content"], str):
            o.problem = "not one choice with a message"
        elif lps and len(ch[0]["logprobs"]["content"]) != o.completion_tokens:
            o.problem = f"{len(ch[0]['logprobs']['content'])} logprobs for {o.completion_tokens} tokens"
        else:
            o.problem = ctx.same_text("chat", body, ch[0]["message"]["content"])
    return _finish(o, ctx)


async def completion_n(ctx: Context, rng: random.Random) -> Outcome:
    """Plain completions with n = 2..3 and logprobs: n choices, indices 0..n-1, tokens == usage."""
    o = Outcome("completion_n_logprobs")
    n = rng.randint(2, 3)
    body = {"prompt": rng.choice(TEXT_PROMPTS), "max_tokens": rng.randint(8, 32), "n": n, "logprobs": 2,
            "temperature": 0.8, "seed": rng.randrange(1 << 30)}
    data = await _post(ctx, "/v1/completions", body, o)
    if data is not None and _check_usage(data, o) is not None:
        ch = data["choices"]
        got = sum(len(c["logprobs"]["tokens"]) for c in ch)
        if sorted(c["index"] for c in ch) != list(range(n)):
            o.problem = f"indices {[c['index'] for c in ch]} for n={n}"
        elif got != o.completion_tokens:
            o.problem = f"{got} logprob tokens for usage.completion_tokens={o.completion_tokens}"
    return _finish(o, ctx)


async def completion_stream_n(ctx: Context, rng: random.Random) -> Outcome:
    """Streamed completions with n = 2: one finish per index, usage at the end."""
    o = Outcome("completion_stream_n")
    body = {"prompt": rng.choice(TEXT_PROMPTS), "max_tokens": rng.randint(8, 32), "n": 2, "temperature": 0.8,
            "seed": rng.randrange(1 << 30), "stream_options": {"include_usage": True}}
    chunks = await _stream(ctx, "/v1/completions", body, o)
    if chunks is not None:
        texts = _stream_choices(chunks, "completion", o)
        if texts is not None and sorted(texts) != [0, 1]:
            o.problem = f"streamed indices {sorted(texts)} for n=2"
    return _finish(o, ctx)


def stop_cut_problem(text: str, tokens: list[str], finish_reason: str, stop_reason) -> str | None:
    """What is wrong with a choice's output tokens (their logprob strings) given its text, if anything.
    A stop string cuts the tokens too: the last one completes the stop string and none comes after it
    (ISD commits several tokens per step; those past the stop are not output). Without a stop string
    the tokens spell the text. Spaces are ignored (decoding tokens one by one keeps spaces that decoding
    them together cleans up, as before punctuation); skipped where a token is part of a character (U+FFFD)."""
    def bare(x: str) -> str:
        return x.replace(" ", "")

    full = bare("".join(tokens))
    if "\ufffd" in full:
        return None
    if finish_reason == "stop" and isinstance(stop_reason, str):
        want = bare(text + stop_reason)
        if not full.startswith(want):
            return f"tokens {full[-40:]!r} do not reach the stop string {stop_reason!r}"
        if len(bare("".join(tokens[:-1]))) >= len(want):
            return (f"tokens past the stop string {stop_reason!r}: {''.join(tokens)[-40:]!r} "
                    f"(text ends {text[-20:]!r})")
    elif finish_reason == "length" and full != bare(text):
        return f"tokens {''.join(tokens)[-40:]!r} do not spell the text {text[-40:]!r}"
    return None


async def completion_stop(ctx: Context, rng: random.Random) -> Outcome:
    """Plain completion with stop strings and logprobs: no stop string in the text, and the tokens
    (usage, logprobs) end with the one that completes the stop string."""
    o = Outcome("completion_stop")
    stops = rng.choice(STOPS)
    body = {"prompt": rng.choice(TEXT_PROMPTS), "max_tokens": rng.randint(16, 48), "stop": list(stops),
            "logprobs": 0, **_sampling(rng)}
    data = await _post(ctx, "/v1/completions", body, o)
    if data is not None and _check_usage(data, o) is not None:
        c = data["choices"][0]
        tokens = c["logprobs"]["tokens"]
        if c["finish_reason"] not in ("stop", "length"):
            o.problem = f"finish_reason {c['finish_reason']!r}"
        elif len(tokens) != o.completion_tokens:
            o.problem = f"{len(tokens)} logprob tokens for usage.completion_tokens={o.completion_tokens}"
        else:
            o.problem = (stop_cut_problem(c["text"], tokens, c["finish_reason"], c["stop_reason"])
                         or ctx.same_text("completion", body, c["text"]))
        _no_stop_in([c["text"]], stops, o)
    return _finish(o, ctx)


async def echo_score(ctx: Context, rng: random.Random) -> Outcome:
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 0 or 1."""
    o = Outcome("echo_score")
    prompt = rng.choice(TEXT_PROMPTS) + " " + rng.choice(CHAT_PROMPTS)
    body = {"prompt": prompt, "max_tokens": rng.choice((0, 1)), "echo": True, "logprobs": 1, "temperature": 0}
    data = await _post(ctx, "/v1/completions", body, o)
    if data is not None and _check_usage(data, o) is not None:
        c = data["choices"][0]
        lp = c["logprobs"]
        if not c["text"].startswith(prompt):
            o.problem = "echoed text does not start with the prompt"
        elif lp["token_logprobs"][0] is not None or any(x is None for x in lp["token_logprobs"][1:]):
            o.problem = "token_logprobs: the first must be null and the rest numbers"
        elif len(lp["tokens"]) != o.prompt_tokens + o.completion_tokens:
            o.problem = f"{len(lp['tokens'])} tokens for {o.prompt_tokens} + {o.completion_tokens}"
    return _finish(o, ctx)


async def long_prompt(ctx: Context, rng: random.Random) -> Outcome:
    """A prompt (token ids) that fills the context to just under its limit."""
    o = Outcome("long_prompt")
    max_tokens = rng.randint(2, 6)
    n = ctx.max_model_len - max_tokens - rng.randint(0, 4)
    async with ctx.long_lock:
        data = await _post(ctx, "/v1/completions", {"prompt": ctx.prompt_ids(n), "max_tokens": max_tokens,
                                                    "temperature": 0}, o)
    if data is not None and _check_usage(data, o) is not None and o.prompt_tokens != n:
        o.problem = f"usage.prompt_tokens {o.prompt_tokens} for a prompt of {n} ids"
    return _finish(o, ctx)


async def over_limit(ctx: Context, rng: random.Random) -> Outcome:
    """Just over the context (the prompt alone, or prompt + max_tokens): 400 context_length_exceeded."""
    o = Outcome("over_limit", expected_status=400)
    if rng.random() < 0.5:
        n, max_tokens = ctx.max_model_len + rng.randint(0, 2), 4
    else:
        n, max_tokens = ctx.max_model_len - 4, 5 + rng.randint(0, 8)
    data = await _post(ctx, "/v1/completions", {"prompt": ctx.prompt_ids(n), "max_tokens": max_tokens}, o)
    if data is not None and o.status == 400 and data.get("error", {}).get("code") != "context_length_exceeded":
        o.problem = f"400 with code {data.get('error', {}).get('code')!r}"
    return _finish(o, ctx)


async def hangup_stream(ctx: Context, rng: random.Random) -> Outcome:
    """A stream the client closes after 1-3 chunks, or (one in four) before its first byte."""
    o = Outcome("hangup_stream")
    body = {"messages": [{"role": "user", "content": rng.choice(CHAT_PROMPTS)}], "max_tokens": 48,
            "ignore_eos": True, **_sampling(rng)}
    if rng.random() < 0.25:
        try:
            await asyncio.wait_for(_stream(ctx, "/v1/chat/completions", body, o), timeout=rng.uniform(0.01, 0.2))
        except asyncio.TimeoutError:
            o.hangup, o.status, o.exception = True, None, None
        return _finish(o, ctx)
    chunks = await _stream(ctx, "/v1/chat/completions", body, o, hang_after=rng.randint(1, 3))
    if chunks is not None:  # it ended before we hung up: an ordinary stream (no usage asked for)
        _stream_choices(chunks, "chat", o, usage=False)
    return _finish(o, ctx)


async def hangup_plain(ctx: Context, rng: random.Random) -> Outcome:
    """A plain request the client gives up on after 0.2-1.5 s (its connection is closed)."""
    o = Outcome("hangup_plain")
    body = {"prompt": rng.choice(TEXT_PROMPTS), "max_tokens": 48, "ignore_eos": True, **_sampling(rng)}
    try:
        data = await asyncio.wait_for(_post(ctx, "/v1/completions", body, o), timeout=rng.uniform(0.2, 1.5))
    except asyncio.TimeoutError:
        o.hangup, o.status, o.exception = True, None, None
        return _finish(o, ctx)
    if data is not None:
        _check_usage(data, o)
    return _finish(o, ctx)


SCENARIOS: dict[str, tuple[float, Scenario]] = {  # name -> (weight in the mix, coroutine)
    "chat_stream": (3.0, chat_stream),
    "chat_plain": (2.0, chat_plain),
    "completion_n_logprobs": (1.5, completion_n),
    "completion_stream_n": (1.5, completion_stream_n),
    "completion_stop": (1.5, completion_stop),
    "echo_score": (1.5, echo_score),
    "long_prompt": (0.4, long_prompt),
    "over_limit": (0.6, over_limit),
    "hangup_stream": (1.0, hangup_stream),
    "hangup_plain": (0.8, hangup_plain),
}


def pick(rng: random.Random, ctx: Context) -> Scenario:
    names = [k for k in SCENARIOS if not (k == "long_prompt" and ctx.long_lock.locked())]
    name = rng.choices(names, weights=[SCENARIOS[k][0] for k in names])[0]
    return SCENARIOS[name][1]


async def run_scenario(ctx: Context, fn: Scenario, rng: random.Random) -> Outcome:
    """One scenario, timed, with any unforeseen client error recorded, never raised."""
    t = time.monotonic()
    try:
        o = await fn(ctx, rng)
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as e:  # a malformed response body
        name = next((k for k, (_, f) in SCENARIOS.items() if f is fn), fn.__name__)
        o = _finish(Outcome(name, problem=f"malformed response: {type(e).__name__}: {e}"[:200]), ctx)
    o.latency_s = round(time.monotonic() - t, 3)
    return o


async def settle(client: httpx.AsyncClient, url: str, limit_s: float) -> EndState:
    """Poll /metrics until no request runs or waits and no KV block is used, at most ``limit_s``."""
    t0 = time.monotonic()
    while True:
        r = await client.get(url + "/metrics")
        e = end_state(parse_prometheus(r.text), round(time.monotonic() - t0, 2))
        if is_idle(e) or time.monotonic() - t0 >= limit_s:
            return e
        await asyncio.sleep(0.25)


@dataclass
class RunData:
    """What ``drive`` collects; ``run_soak`` turns it into the report."""

    model: str
    max_model_len: int
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[ProcSample] = field(default_factory=list)  # start, middle, end
    trend: list[ProcSample] = field(default_factory=list)  # one per bucket during the load
    end: EndState = field(default_factory=EndState)
    load_s: float = 0.0


async def capacity_probe(ctx: Context, slots: int) -> tuple[int | None, int]:
    """One request asking for every admission slot (n = running + queue, at most MAX_N = 16): a 503
    after the load means slots leaked. (status, n)."""
    n = min(16, slots)
    try:
        r = await ctx.client.post(ctx.url + "/v1/completions", json={
            "model": ctx.model, "prompt": "Hello", "n": n, "max_tokens": 1, "temperature": 0.8, "seed": 1})
    except httpx.HTTPError:
        return None, n
    return r.status_code, n


async def warm_up(ctx: Context, cfg: SoakConfig) -> list[Outcome]:
    """Every scenario once, ``cfg.clients`` at a time (kernels, allocator and KV pages reach their
    steady state before the start sample)."""
    rng = random.Random(cfg.seed)
    sem = asyncio.Semaphore(cfg.clients)

    async def one(fn: Scenario) -> Outcome:
        async with sem:
            return await run_scenario(ctx, fn, rng)

    outcomes = list(await asyncio.gather(*[one(fn) for _, fn in SCENARIOS.values()]))
    for o in outcomes:
        o.end_s = -1.0
    return outcomes


async def load(ctx: Context, cfg: SoakConfig, pid: int, data: RunData) -> None:
    """``cfg.clients`` clients drive the mix until the deadline (requests in flight then finish);
    the process is sampled half way (middle) and at every bucket's end (trend)."""
    ctx.t0 = time.monotonic()
    deadline = ctx.t0 + cfg.duration_s
    data.samples.append(sample_process(pid, "start", 0.0))

    async def middle() -> None:
        await asyncio.sleep(cfg.duration_s / 2)
        data.samples.append(sample_process(pid, "middle", ctx.now()))

    async def trend() -> None:
        k = 1
        while ctx.t0 + k * cfg.bucket_s < deadline:
            await asyncio.sleep(ctx.t0 + k * cfg.bucket_s - time.monotonic())
            data.trend.append(sample_process(pid, f"t+{k * cfg.bucket_s:g}", ctx.now()))
            k += 1

    async def client(i: int) -> None:
        rng = random.Random(cfg.seed * 1000 + i + 1)
        while time.monotonic() < deadline:
            o = await run_scenario(ctx, pick(rng, ctx), rng)
            data.outcomes.append(o)
            if o.exception == "ConnectError":  # nobody listens any more: the server died
                raise RuntimeError("the server stopped accepting connections")

    await asyncio.gather(middle(), trend(), *[client(i) for i in range(cfg.clients)])
    data.load_s = ctx.now()


async def drive(cfg: SoakConfig, srv: ServerProcess) -> RunData:
    """Warm-up, the timed load, settle, the end sample, /metrics and the capacity probe."""
    limits = httpx.Limits(max_connections=cfg.clients * 2 + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:
        info = (await client.get(srv.url + "/v1/models")).json()["data"][0]
        data = RunData(info["id"], int(info["max_model_len"]))
        tok = await client.post(srv.url + "/tokenize", json={"prompt": FILLER * 8, "add_special_tokens": False})
        ctx = Context(client, srv.url, data.model, data.max_model_len, tok.json()["tokens"], t0=time.monotonic())
        log(cfg, f"model {data.model}, context {data.max_model_len} tokens; warm-up: every scenario once")
        data.outcomes += await warm_up(ctx, cfg)
        log(cfg, f"load: {cfg.clients} clients for {cfg.duration_s:.0f} s")
        await load(ctx, cfg, srv.pid, data)
        log(cfg, f"load done after {data.load_s:.0f} s ({len(data.outcomes)} requests); settling")
        data.end = await settle(client, srv.url, cfg.settle_s)
        data.samples.append(sample_process(srv.pid, "end", ctx.now()))
        data.end.capacity_probe, data.end.capacity_probe_n = await capacity_probe(ctx, cfg.max_running + cfg.max_queue)
    return data


def run_soak(cfg: SoakConfig) -> SoakReport:
    """Start the server, drive the load, stop the server (always, also on Ctrl-C), judge the result."""
    srv = ServerProcess(cfg)
    try:
        srv.start()
        data = asyncio.run(drive(cfg, srv))
    except BaseException:
        code = srv.stop()
        log(cfg, f"server stopped (exit {code}); its log ends with:\n{srv.log_tail(1500)}")
        raise
    code = srv.stop()
    log(cfg, f"server stopped (exit {code})")
    report = SoakReport(minutes=cfg.minutes, clients=cfg.clients, model=data.model, max_model_len=data.max_model_len,
                        load_s=round(data.load_s, 1), samples=data.samples, end=data.end,
                        buckets=bucketize(data.outcomes, cfg.bucket_s, data.load_s, data.trend + data.samples),
                        server_exit_code=code, **summarize(data.outcomes))
    report.targets = evaluate_targets(report)
    if not cfg.server_log and report.passed:
        srv.log_path.unlink(missing_ok=True)
    elif not report.passed:
        log(cfg, f"server log kept: {srv.log_path}")
    return report


# -- output ----------------------------------------------------------------------------------------

def format_report(r: SoakReport) -> str:
    """The human-readable report: totals, scenarios, process samples, end state, tok/s, targets."""
    lines = [(f"soak: {r.model} (context {r.max_model_len}), {r.clients} clients, {r.minutes:g} min "
             f"(load phase {r.load_s:.0f} s)"), "",
             (f"requests {r.requests} (warm-up included)  served {r.served}  deliberate hang-ups {r.hangups}  "
             f"expected 400s {r.expected_errors}  output tokens (load) {r.completion_tokens}"),
             (f"HTTP statuses {json.dumps(r.status_counts)}  unexpected {json.dumps(r.errors_by_code)}  "
             f"client exceptions {json.dumps(r.client_exceptions)}  malformed {r.invalid_responses}"), "",
             f"{'scenario':<22} {'requests':>8} {'served':>7} {'hang-ups':>8} {'p50 (s)':>8} {'max (s)':>8}"]
    lines += [f"{k:<22} {v.requests:>8} {v.served:>7} {v.hangups:>8} {v.latency_p50_s:>8.2f} {v.latency_max_s:>8.2f}"
              for k, v in r.scenarios.items()]
    lines += ["", f"{'sample':<8} {'t (s)':>7} {'RSS (MiB)':>10} {'threads':>8}"]
    lines += [f"{s.label:<8} {s.t_s:>7.1f} {s.rss_mb:>10.1f} {s.threads:>8}" for s in r.samples]
    e = r.end
    lines += ["", (f"end (/metrics after {e.settle_s} s settle): kv_cache_usage_perc={e.kv_cache_usage_perc} "
                  f"kv_blocks_in_use={e.kv_blocks_in_use} running={e.running} waiting={e.waiting} "
                  f"client_disconnects={e.client_disconnects}; n={e.capacity_probe_n} probe -> {e.capacity_probe}")]
    lines += ["", f"{'bucket (s)':<12} {'answered':>8} {'tokens':>7} {'tok/s':>7} {'RSS (MiB)':>10} {'threads':>8}"]
    for b in r.buckets:
        rss = "" if b.rss_mb is None else f"{b.rss_mb:.1f}"
        lines.append(f"{f'{b.start_s:.0f}-{b.end_s:.0f}':<12} {b.requests:>8} {b.completion_tokens:>7} "
                     f"{b.tok_per_s:>7.2f} {rss:>10} {b.threads if b.threads is not None else '':>8}")
    lines += ["", f"{'target':<32} {'result':<6} detail"]
    lines += [f"{t.name:<32} {'PASS' if t.ok else 'FAIL':<6} {t.detail}" for t in r.targets]
    lines += ["", "soak: PASSED" if r.passed else "soak: FAILED"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = SoakConfig()
    p = argparse.ArgumentParser(
        prog="python -m idlm.eval.soak", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=d.minutes, help=f"load duration (default {d.minutes:g})")
    p.add_argument("--clients", type=int, default=d.clients, help=f"concurrent clients (default {d.clients})")
    p.add_argument("--bucket", type=float, default=d.bucket_s, help=f"tok/s bucket in seconds (default {d.bucket_s:g})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the clients' random choices (default 0)")
    p.add_argument("--model", default=None, help="idlm serve --model (default: the default model)")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len,
                   help=f"idlm serve --max-model-len: the context the near/over-limit prompts aim at (default "
                        f"{d.max_model_len}, so a 2-core CPU prefills a near-limit prompt in seconds; 0 = the "
                        "model's own)")
    p.add_argument("--max-running", type=int, default=d.max_running, help=f"idlm serve --max-running (default {d.max_running})")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help=f"idlm serve --max-queue (default {d.max_queue})")
    p.add_argument("--threads", type=int, default=None, help="idlm serve --threads (default: all cores)")
    p.add_argument("--serve-args", default="", help="more idlm serve arguments, one shell-quoted string")
    p.add_argument("--settle", type=float, default=d.settle_s,
                   help=f"seconds to wait after the load for the KV / running gauges to reach 0 (default {d.settle_s:g})")
    p.add_argument("--server-log", default=None, help="write the server's output here (default: a temporary file, "
                   "deleted when the soak passes)")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def config_from_args(a: argparse.Namespace) -> SoakConfig:
    if a.minutes <= 0 or a.clients < 1 or a.bucket <= 0:
        raise SystemExit("soak: --minutes and --bucket must be > 0 and --clients >= 1")
    if a.clients * MAX_CHOICES > a.max_running + a.max_queue:
        raise SystemExit(f"soak: {a.clients} clients may ask for {a.clients * MAX_CHOICES} choices at once; raise "
                         "--max-queue (a full queue answers 503, which the soak counts as a failure)")
    return SoakConfig(minutes=a.minutes, clients=a.clients, bucket_s=a.bucket, seed=a.seed, model=a.model,
                      max_model_len=a.max_model_len or None, max_running=a.max_running, max_queue=a.max_queue,
                      threads=a.threads, serve_args=tuple(shlex.split(a.serve_args)), settle_s=a.settle,
                      server_log=a.server_log, verbose=not a.quiet)


def _sigterm_as_interrupt(_sig, _frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)  # so a `kill` also stops the server (finally)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C, even where started with SIGINT ignored
    try:
        report = run_soak(cfg)
    except KeyboardInterrupt:
        print("soak: interrupted; the server was stopped", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the server did not start or died under us: one line, status 2
        print(f"soak: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    line = json.dumps(report.to_json(), separators=(",", ":"))
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line, flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
