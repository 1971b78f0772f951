"""`idlm serve`: load the model in the background, serve HTTP at once (503 until ready), drain on SIGTERM.

SIGTERM (or a first Ctrl-C): /health and new requests answer 503, in-flight requests run to
completion for up to ``--shutdown-timeout`` seconds (then they are aborted), the engine loop stops,
and the process exits 0. A second signal exits at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time

import uvicorn

from ..config import ServerConfig
from .app import ServerState, build_app
from .metrics import ServerMetrics

log = logging.getLogger("idlm.server")
# request line + headers: h11's default (16 KiB) answered headers past it with a plain-text 400 and a
# dropped connection, but only when they came in more than one TCP segment (any real network)
MAX_HEADER_BYTES = 128 * 1024


def default_model_name(model: str | None) -> str:
    if model is None:
        return "idlm-smollm2-135m-instruct"
    name = model.rstrip("/").split("/")[-1]
    return name.removesuffix(".gguf")


def load_into(state: ServerState, server: DrainingServer | None = None) -> None:
    """Load the model, tokenizer and engine into ``state`` (runs in a thread while HTTP is up). If
    loading fails, the error is kept (``/health`` says it) and the server is told to exit."""
    from ..engine import AsyncEngine, LLMEngine
    from ..model import USER_ERRORS, load_for_inference

    cfg = state.config
    try:
        lm = load_for_inference(cfg.load)
        for line in [*lm.report(), f"forward: {lm.forward}"]:
            print(f"idlm: {line}", file=sys.stderr, flush=True)
        tok = lm.tokenizer()
        engine = LLMEngine(lm.model, cfg.engine)
        if cfg.stride == "auto":
            _ = engine.stride_policy.cost  # calibrate now (cached on disk), not on the first request
        # warm the kernels on a short request so the first client does not pay for it
        from ..config import SamplingParams

        engine.generate([tok("warm up")["input_ids"][:4] or [0]], SamplingParams(max_new_tokens=4))
        engine.reset_metrics()
        state.tokenizer = tok
        state.vocab_size = lm.model.cfg.vocab_size
        state.max_model_len = engine.max_model_len
        aeng = AsyncEngine(engine)
        aeng.start()
        state.engine = aeng
    except Exception as e:  # noqa: BLE001 - reported on /health, then the process exits 2
        why = str(e) if isinstance(e, USER_ERRORS) else f"{type(e).__name__}: {e}"
        state.load_error = " ".join(why.split())
        if server is not None:
            server.should_exit = True
        return
    url = f"http://{cfg.host}:{cfg.port}"
    print(f"idlm: serving {state.model_name} at {url} (OpenAI API at {url}/v1, playground at {url}/)", flush=True)


class DrainingServer(uvicorn.Server):
    """uvicorn, with a graceful drain on the first SIGTERM / SIGINT and an exit status of 0."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._signals = 0

    async def serve(self, sockets=None) -> None:
        self.state.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def install_signal_handlers(self) -> None:  # older uvicorn
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, self.handle_exit)

    def handle_exit(self, sig, frame) -> None:
        self._signals += 1
        if self._signals > 1 or self.state.loop is None:
            self.should_exit = True
            self.force_exit = self._signals > 2
            return
        self.state.draining = True
        log.warning("idlm: draining (up to %.0f s), then exiting", self.state.config.shutdown_timeout)
        self.state.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        s = self.state
        deadline = time.monotonic() + s.config.shutdown_timeout
        while s.active > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if s.engine is not None:
            await s.engine.shutdown(timeout=0)
        await asyncio.sleep(0.05)  # let the aborted streams send their last chunk
        self.should_exit = True


def serve(cfg: ServerConfig) -> int:
    import torch

    if cfg.api_key is None:
        cfg.api_key = os.environ.get("IDLM_API_KEY") or None
    torch.set_num_threads(cfg.load.threads or os.cpu_count() or 1)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    state = ServerState(cfg, cfg.served_model_name or default_model_name(cfg.load.model))
    state.metrics = ServerMetrics(state.model_name, lambda: state.engine.metrics() if state.engine else None)
    app = build_app(state)
    server = DrainingServer(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=5, access_log=False,
                                           h11_max_incomplete_event_size=MAX_HEADER_BYTES), state)
    threading.Thread(target=load_into, args=(state, server), name="idlm-load", daemon=True).start()
    server.run()
    if state.load_error is not None:
        print(f"idlm: error: the model failed to load: {state.load_error}", file=sys.stderr)
        return 2
    return 0
