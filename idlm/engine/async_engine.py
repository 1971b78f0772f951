"""``AsyncEngine``: the step loop in a background thread, requests as async iterators.

    engine = AsyncEngine(LLMEngine(model, config))
    engine.start()
    async for out in engine.generate(prompt_ids, params, decode):   # RequestOutput per step
        print(out.new_token_ids)
    await engine.shutdown()

The loop thread owns the ``LLMEngine``: callers never touch it directly. They post commands (add,
abort) to a queue; the loop drains the queue between steps, runs a step whenever there is work and
sleeps on the queue otherwise, and hands each output to the request's asyncio queue on the caller's
event loop. Leaving ``generate`` early (a client disconnect, a cancelled task) aborts the request,
so its KV blocks are freed at the next step. If a step raises, the requests in that step are
aborted and get ``EngineStepError``; the others go on. If steps keep failing, the loop stops, every
open request gets ``EngineDeadError``, and ``alive`` turns False (the server's /health then reports 503).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass

from ..config import DecodeConfig, SamplingParams
from ..metrics import EngineMetrics
from .engine import LLMEngine
from .request import RequestOutput


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; no request can be served."""


class EngineStepError(RuntimeError):
    """A step failed; the requests in it were aborted (the engine goes on serving the others)."""


MAX_CONSECUTIVE_FAILURES = 3  # steps in a row that may fail before the loop gives up


@dataclass
class _Add:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    decode: DecodeConfig
    sink: asyncio.Queue  # where this request's outputs go
    loop: asyncio.AbstractEventLoop  # the caller's event loop


@dataclass
class _Abort:
    request_id: str


_STOP = object()


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._thread: threading.Thread | None = None
        self._ids = 0
        self._lock = threading.Lock()
        self.error: str | None = None  # what killed the loop, if anything
        self.draining = False  # shutdown in progress: no new requests

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="idlm-engine", daemon=True)
            self._thread.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams | None = None,
                       decode: DecodeConfig | None = None, request_id: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs as steps commit tokens; the last one is finished.
        Bad input raises ``ConfigError`` before anything is queued."""
        params, decode = params or SamplingParams(), decode or DecodeConfig()
        self.engine.validate(list(prompt_ids), params, decode)
        if not self.alive:
            raise EngineDeadError(self.error or "the engine is not running")
        if self.draining:
            raise EngineDeadError("the engine is shutting down")
        with self._lock:
            self._ids += 1
            rid = request_id or f"async-{self._ids}"
        sink: asyncio.Queue = asyncio.Queue()
        self._commands.put(_Add(rid, list(prompt_ids), params, decode, sink, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                out = await sink.get()
                if isinstance(out, BaseException):
                    raise out
                yield out
                if out.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def metrics(self) -> EngineMetrics:
        """The engine's counters (read without locking: plain numbers, written by the loop)."""
        return self.engine.metrics

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the engine's KV pool holds (fixed at construction: safe from any thread)."""
        return self.engine.kv_capacity_tokens

    def reset_metrics(self) -> None:
        """Zero the engine-wide counters. Call it while no step runs (before ``start``, or idle): the
        loop thread writes the counters without a lock."""
        self.engine.reset_metrics()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop taking requests, let open ones finish (up to ``timeout`` seconds, then abort them),
        and stop the loop."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._sinks and self.alive and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(0.02)
        for rid in list(self._sinks):
            self.abort(rid)
        self._commands.put(_STOP)
        if self._thread is not None:
            await loop.run_in_executor(None, self._thread.join, 10.0)

    # -- the loop thread --------------------------------------------------------------------------

    def _run(self) -> None:
        eng = self.engine
        failures = 0
        try:
            while True:
                block = not eng.has_unfinished()
                if not self._drain(block):
                    return
                if not eng.has_unfinished():
                    continue
                try:
                    outs = eng.step()
                    failures = 0
                except Exception as e:  # keep serving the rest
                    failures += 1
                    if failures >= MAX_CONSECUTIVE_FAILURES:
                        raise
                    traceback.print_exc()
                    self._fail_step(f"{type(e).__name__}: {e}")
                    continue
                for out in outs:
                    self._deliver(out.request_id, out)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
                        eng.release(out.request_id)
        except Exception as e:  # noqa: BLE001 - any failure kills the loop; report it to every request
            self.error = f"{type(e).__name__}: {e}"
            traceback.print_exc()
            for rid in list(self._sinks):
                self._deliver(rid, EngineDeadError(self.error))
            self._sinks.clear()

    def _fail_step(self, why: str) -> None:
        eng = self.engine
        for rid in eng.in_step:
            eng.abort(rid)
            self._deliver(rid, EngineStepError(f"the engine step failed: {why}"))
            self._sinks.pop(rid, None)
        eng.drop_aborted()

    def _drain(self, block: bool) -> bool:
        """Apply queued commands (waiting for one if ``block``). False on stop."""
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                self._sinks[cmd.request_id] = (cmd.sink, cmd.loop)
                try:
                    self.engine.add_request(cmd.prompt_ids, cmd.params, cmd.decode, cmd.request_id)
                except ValueError as e:  # validated by the caller; a duplicate id can still land here
                    self._deliver(cmd.request_id, e)
                    self._sinks.pop(cmd.request_id, None)
            elif isinstance(cmd, _Abort):
                self.engine.abort(cmd.request_id)

    def _deliver(self, request_id: str, item) -> None:
        target = self._sinks.get(request_id)
        if target is None:
            return
        sink, loop = target
        try:
            loop.call_soon_threadsafe(sink.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            self._sinks.pop(request_id, None)
