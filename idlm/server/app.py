"""The OpenAI-compatible HTTP app (FastAPI): routes, auth, limits, streaming, errors.

Text lives here and above; the engine below sees token ids only. Every response that is not a
success is the nested OpenAI error shape (``errors.APIError``); client mistakes are 4xx, never 422
or 500. A client that goes away (streaming or not) aborts its requests, so their KV is freed at the
engine's next step."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..config import MAX_STRIDE, ConfigError, DecodeConfig, SamplingParams, ServerConfig
from ..engine import AsyncEngine, EngineDeadError, EngineStepError
from .errors import APIError, bad
from .generation import ChoiceResult, Delta, Timing, collect, run_choice
from .metrics import ServerMetrics
from .protocol import GenerationRequest, parse_chat, parse_completion, unicode_text

log = logging.getLogger("idlm.server")
STATIC = Path(__file__).parent / "static"
FIELD_NAMES = {"max_new_tokens": "max_tokens"}  # engine field -> OpenAI field, where they differ


@dataclass
class ServerState:
    config: ServerConfig
    model_name: str
    metrics: ServerMetrics | None = None
    tokenizer: object = None
    engine: AsyncEngine | None = None  # None while loading
    max_model_len: int = 0
    vocab_size: int = 0
    draining: bool = False
    load_error: str | None = None
    active: int = 0  # choices admitted and not finished
    loop: asyncio.AbstractEventLoop | None = None
    started: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.alive and not self.draining


# -- helpers ---------------------------------------------------------------------------------------

async def read_json(request: Request, limit: int):
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(400, f"Content-Type must be application/json, got {ctype or 'none'!r}"[:200],
                       "content-type", "invalid_content_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}"[:300], None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", None, "invalid_json") from None


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


class Server:
    """Route handlers over a ``ServerState``."""

    def __init__(self, state: ServerState):
        self.s = state

    # -- admission ---------------------------------------------------------------------------------

    def engine(self) -> AsyncEngine:
        s = self.s
        if s.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if s.load_error:
            raise APIError(503, f"the model failed to load: {s.load_error}", code="load_failed")
        if s.engine is None:
            raise APIError(503, "the model is still loading", code="loading", headers={"Retry-After": "2"})
        if not s.engine.alive:
            raise APIError(503, f"the engine loop stopped: {s.engine.error}", code="engine_dead")
        return s.engine

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.s.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", "model", "model_not_found")

    def encode_text(self, text: str) -> list[int]:
        return list(self.s.tokenizer(text)["input_ids"])

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        s = self.s  # empty and out-of-vocabulary prompts are the engine's to refuse (``validate``)
        if len(ids) + max_tokens > s.max_model_len:
            raise APIError(400, f"This model's maximum context length is {s.max_model_len} tokens. However, you "
                                f"requested {max_tokens} output tokens and your prompt contains at least "
                                f"{len(ids)} input tokens, for a total of at least {len(ids) + max_tokens} "
                                "tokens. Please reduce the length of the input prompt or the number of "
                                "requested output tokens.", "max_tokens" if len(ids) < s.max_model_len else "prompt",
                           "context_length_exceeded")

    def admit(self, n: int) -> _Admission:
        cfg = self.s.config
        if n > cfg.max_admitted:  # more than the server ever takes: retrying cannot help
            raise bad(f"this request asks for {n} choices (prompts × n); the server takes at most "
                      f"{cfg.max_admitted} at once", "n")
        if self.s.active + n > cfg.max_admitted:
            self.s.metrics.rejected.inc()
            raise APIError(503, f"the server is at capacity ({cfg.engine.max_running} running + {cfg.max_queue} "
                                "queued); "
                                "retry later", code="server_overloaded", headers={"Retry-After": "1"})
        return _Admission(self.s, n)

    def settings(self, req: GenerationRequest, max_tokens: int) -> tuple[SamplingParams, DecodeConfig]:
        cfg = self.s.config
        score = req.echo and req.logprobs is not None
        try:
            params = SamplingParams(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                    max_new_tokens=max(1, max_tokens), stop_token_ids=req.stop_token_ids,
                                    ignore_eos=req.ignore_eos, logprobs=req.logprobs,
                                    prompt_logprobs=req.logprobs if score else None)
            # coupled sampling: each token's randomness is keyed by (seed, position), so a seeded request
            # gives the same text whatever stride the load picks and whatever else is in the batch
            decode = DecodeConfig(mode=req.mode or cfg.mode, stride=req.stride or cfg.stride,
                                  sampling_mode="coupled", tree=cfg.tree if (req.mode or cfg.mode) == "isd" else 0)
        except ConfigError as e:
            raise bad(str(e), FIELD_NAMES.get(e.field, e.field)) from None
        return params, decode

    # -- generation --------------------------------------------------------------------------------

    def plan(self, req: GenerationRequest) -> list[tuple[list[int], str]]:
        """(prompt ids, prompt text) per prompt."""
        s = self.s
        if req.kind == "chat":
            try:
                ids = s.tokenizer.apply_chat_template(list(req.messages), add_generation_prompt=True, tokenize=True)
            except Exception as e:  # noqa: BLE001 - a template that rejects this conversation (roles, order)
                raise bad(f"the chat template rejected these messages: {e}"[:300], "messages") from None
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [(list(ids), "")]
        out = []
        for p in req.prompts:
            if isinstance(p, str):
                out.append((self.encode_text(p), p))
            elif any(t >= s.vocab_size for t in p):  # before decode, which overflows on ids past 64 bits
                raise bad(f"prompt token ids must be integers in [0, {s.vocab_size})", "prompt")
            else:
                out.append((list(p), s.tokenizer.decode(list(p))))
        return out

    async def respond(self, request: Request, req: GenerationRequest):
        s = self.s
        engine = self.engine()
        self.check_model(req.model)
        if req.unknown:
            log.info("ignoring unknown fields: %s", ", ".join(req.unknown))
        prompts = self.plan(req)
        choices = []
        for pi, (ids, text) in enumerate(prompts):
            max_tokens = req.max_tokens
            if max_tokens is None:  # completions: 16; chat: the rest of the context (and of the KV pool)
                widest = DecodeConfig(stride=MAX_STRIDE, tree=s.config.tree).window  # the widest ISD window it may need
                pool = engine.kv_capacity_tokens - widest
                max_tokens = 16 if req.kind == "completion" else max(1, min(s.max_model_len, pool) - len(ids))
            self.check_prompt(ids, max_tokens)
            for k in range(req.n):
                r = req if req.seed is None or k == 0 else _with_seed(req, req.seed + k)
                params, decode = self.settings(r, max_tokens)
                try:
                    engine.engine.validate(ids, params, decode)
                except ConfigError as e:
                    raise bad(str(e), FIELD_NAMES.get(e.field, e.field)) from None
                choices.append(_Choice(pi * req.n + k, pi, ids, text, params, decode, max_tokens == 0,
                                       () if max_tokens == 0 else req.stop))
        admission = self.admit(len(choices))
        rid = f"{'chatcmpl' if req.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        if not req.stream:
            try:
                return await self._complete(request, req, rid, choices)
            finally:
                admission.release()
        stream = self._stream(req, rid, choices, admission)
        weakref.finalize(stream, admission.release)  # a stream the client left before it started
        return StreamingResponse(stream, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _deltas(self, rid: str, c: _Choice, timing: Timing):
        return run_choice(self.s.engine, self.s.tokenizer, f"{rid}-{c.index}", c.ids, c.params, c.decode,
                          c.stops, timing, c.prompt_lps)

    def _finish(self, c: _Choice, timing: Timing, reason: str) -> None:
        m = self.s.metrics
        m.finished(reason)
        m.e2e.observe(time.perf_counter() - timing.start)
        if timing.first is not None:
            m.ttft.observe(timing.first)
        for g in timing.gaps:
            m.itl.observe(g)

    async def _complete(self, request: Request, req: GenerationRequest, rid: str, choices: list[_Choice]):
        start = time.perf_counter()
        timings = [Timing(start) for _ in choices]
        tasks = [asyncio.create_task(collect(self._deltas(rid, c, t), ChoiceResult()))
                 for c, t in zip(choices, timings)]
        watcher = asyncio.create_task(_wait_disconnect(request))
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending | {watcher}, return_when=asyncio.FIRST_COMPLETED)
                if watcher in done:
                    self.s.metrics.disconnects.inc()
                    for t in tasks:
                        t.cancel()
                    return Response(status_code=499)
                pending.discard(watcher)
            results = [t.result() for t in tasks]
        except EngineDeadError as e:
            raise APIError(503, f"the engine stopped: {e}", code="engine_dead") from None
        except EngineStepError as e:
            raise APIError(500, str(e), code="engine_error") from None
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()
        for c, t, r in zip(choices, timings, results):
            self._finish(c, t, r.finish_reason)
        return JSONResponse(self._body(req, rid, choices, results))

    async def _stream(self, req: GenerationRequest, rid: str, choices: list[_Choice], admission: _Admission):
        start = time.perf_counter()
        created = int(time.time())
        timings = [Timing(start) for _ in choices]
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int):
            try:
                async for d in self._deltas(rid, choices[i], timings[i]):
                    await queue.put((i, d))
            except Exception as e:  # noqa: BLE001 - reported to the client as an error chunk
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(choices))]
        open_choices = len(choices)
        results = [ChoiceResult() for _ in choices]
        finished_ok = False
        try:
            if req.kind == "chat":
                for c in choices:
                    yield _sse(self._chunk(req, rid, created, c.index, {"role": "assistant", "content": ""}, None))
            while open_choices:
                i, d = await queue.get()
                c = choices[i]
                if isinstance(d, BaseException):
                    err = APIError(500, f"the engine failed: {d}", code="engine_error")
                    yield _sse(err.body())
                    yield "data: [DONE]\n\n"
                    return
                results[i].add(d)
                if d.finish_reason is not None:
                    open_choices -= 1
                    self._finish(c, timings[i], d.finish_reason)
                if d.text or d.finish_reason is not None or (c.want_lps and d.token_ids):
                    yield _sse(self._delta_chunk(req, rid, created, c, d))
            if req.include_usage:
                yield _sse({"id": rid, "object": self._object(req, True), "created": created,
                            "model": self.s.model_name, "choices": [], "usage": _usage(choices, results)})
            yield "data: [DONE]\n\n"
            finished_ok = True
        finally:
            if not finished_ok:
                self.s.metrics.disconnects.inc()
            for t in tasks:
                t.cancel()
            admission.release()

    # -- response bodies ---------------------------------------------------------------------------

    def _object(self, req: GenerationRequest, chunk: bool) -> str:
        if req.kind == "chat":
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    def _chunk(self, req, rid, created, index, delta, finish, extra=None) -> dict:
        choice = {"index": index}
        if req.kind == "chat":
            choice["delta"] = delta
        else:
            choice["text"] = delta
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if extra:
            choice.update(extra)
        return {"id": rid, "object": self._object(req, True), "created": created, "model": self.s.model_name,
                "choices": [choice]}

    def _delta_chunk(self, req, rid, created, c: _Choice, d: Delta) -> dict:
        tok = self.s.tokenizer
        extra = {"idlm": {"pieces": [tok.decode([t]) for t in d.token_ids], "drafted": d.drafted}}
        if d.finish_reason is not None:
            extra["stop_reason"] = d.stop_reason
            if d.stats is not None:
                extra["idlm"].update(_idlm_stats(d.stats, c.decode))
        if c.want_lps:
            extra["logprobs"] = self._logprobs(req, d.logprobs)
        delta = {"content": d.text} if req.kind == "chat" else d.text
        return self._chunk(req, rid, created, c.index, delta, d.finish_reason, extra)

    def _logprobs(self, req: GenerationRequest, lps, prompt: tuple[list[int], list] | None = None) -> dict:
        """OpenAI logprobs: chat ``{"content": [...]}``; completions ``{"tokens", "token_logprobs",
        "top_logprobs", "text_offset"}``, with the prompt's tokens first when echoing (the first one
        has no logprob: nothing predicts it)."""
        tok = self.s.tokenizer

        def text(t):
            return tok.decode([t])

        if req.kind == "chat":
            def entry(t, lp):
                s = text(t)
                return {"token": s, "logprob": lp, "bytes": list(s.encode())}
            return {"content": [{**entry(x.token_id, x.logprob), "top_logprobs": [entry(t, v) for t, v in x.top]}
                                for x in lps]}
        tokens, token_lps, tops, offsets, pos = [], [], [], [], 0
        pairs = list(zip(*prompt)) if prompt else []
        for tid, x in pairs + [(x.token_id, x) for x in lps]:
            piece = text(tid)
            tokens.append(piece)
            offsets.append(pos)
            pos += len(piece)
            token_lps.append(None if x is None else x.logprob)
            tops.append(None if x is None else {**{text(t): v for t, v in x.top}, piece: x.logprob})
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def _body(self, req: GenerationRequest, rid: str, choices: list[_Choice], results: list[ChoiceResult]) -> dict:
        out = []
        for c, r in zip(choices, results):
            lps = [] if c.score_only else r.logprobs
            text = "" if c.score_only else r.text
            if req.echo:
                text = c.text + text
            choice = {"index": c.index, "finish_reason": "length" if c.score_only else r.finish_reason,
                      "stop_reason": r.stop_reason, "logprobs": None,
                      "idlm": _idlm_stats(r.stats, c.decode) if r.stats is not None else None}
            if c.want_lps:
                prompt = (c.ids, c.prompt_lps) if req.echo and c.prompt_lps else None
                choice["logprobs"] = self._logprobs(req, lps, prompt)
            if req.kind == "chat":
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            out.append(choice)
        return {"id": rid, "object": self._object(req, False), "created": int(time.time()),
                "model": self.s.model_name, "choices": out, "usage": _usage(choices, results)}


class _Admission:
    """Choices counted against the queue bound until released (once)."""

    def __init__(self, state: ServerState, n: int):
        self.state, self.n = state, n
        state.active += n

    def release(self) -> None:
        if self.n:
            self.state.active -= self.n
            self.n = 0


@dataclass
class _Choice:
    index: int
    prompt_index: int
    ids: list[int]
    text: str  # prompt text (echo)
    params: SamplingParams
    decode: DecodeConfig
    score_only: bool  # echo with max_tokens 0: the prompt is scored, nothing generated is returned
    stops: tuple[str, ...] = ()
    prompt_lps: list = field(default_factory=list)  # filled with the first tokens when the prompt is scored

    @property
    def want_lps(self) -> bool:
        return self.params.logprobs is not None


def _with_seed(req: GenerationRequest, seed: int) -> GenerationRequest:
    from dataclasses import replace

    return replace(req, seed=seed % 2 ** 63)


def _usage(choices: list[_Choice], results: list[ChoiceResult]) -> dict:
    prompt = sum(len(c.ids) for c in {c.prompt_index: c for c in choices}.values())
    completion = sum(0 if c.score_only else len(r.token_ids) for c, r in zip(choices, results))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _idlm_stats(stats, decode: DecodeConfig) -> dict:
    return {"mode": decode.mode, "stride": decode.stride if decode.mode == "isd" else 1, "forwards": stats.forwards,
            "tokens": stats.tokens, "tpf": round(stats.tpf, 4), "accepted_per_position": list(stats.accepted_at),
            "tested_per_position": list(stats.tested_at), "proposed_per_position": list(stats.proposed_at),
            "preemptions": stats.preemptions}


# -- the app ---------------------------------------------------------------------------------------

OPEN_PATHS = {"/health", "/version", "/", "/favicon.ico"}


class AuthMiddleware:
    """Bearer-key check (constant time) on everything but /health, /version and the playground page."""

    def __init__(self, app, key: str | None):
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        token = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.key.encode()):
            resp = APIError(401, "Unauthorized: a valid 'Authorization: Bearer <key>' header is required",
                            None, "invalid_api_key")
            return await resp.response()(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    """The app: error handlers, routes, and the bearer-key middleware around them."""
    app = FastAPI(title="idlm", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    srv = Server(state)
    _add_error_handlers(app)
    _add_info_routes(app, state)
    _add_generation_routes(app, srv, state.config.max_body_bytes)
    _add_tokenizer_routes(app, srv, state.config.max_body_bytes)
    return AuthMiddleware(app, state.config.api_key)


def _add_error_handlers(app: FastAPI) -> None:
    """Every failure as the nested OpenAI error shape: ours as raised, routing's as 404 / 405, anything
    else as a logged 500."""

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, e: StarletteHTTPException):
        msg = {404: "no such route", 405: "method not allowed"}.get(e.status_code, str(e.detail))
        return APIError(e.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}.get(
            e.status_code), type="not_found_error" if e.status_code == 404 else "invalid_request_error").response()

    @app.exception_handler(Exception)
    async def _internal(_request, e: Exception):
        log.exception("internal error")
        return APIError(500, f"internal error: {type(e).__name__}", code="internal_error").response()


def _add_info_routes(app: FastAPI, state: ServerState) -> None:
    """/health, /version, /v1/models, /metrics and the playground page."""

    @app.get("/health")
    async def health():
        if state.ready:
            return Response(status_code=200)
        why = ("shutting down" if state.draining else "loading" if state.engine is None and not state.load_error
               else f"engine unavailable: {state.load_error or (state.engine.error if state.engine else '')}")
        return APIError(503, why, code="unavailable").response()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": int(state.started),
                                            "owned_by": "idlm", "root": state.config.load.model or state.model_name,
                                            "max_model_len": state.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return HTMLResponse((STATIC / "index.html").read_text())


def _add_generation_routes(app: FastAPI, srv: Server, limit: int) -> None:
    """/v1/completions and /v1/chat/completions (bodies of at most ``limit`` bytes)."""

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await srv.respond(request, parse_completion(await read_json(request, limit)))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await srv.respond(request, parse_chat(await read_json(request, limit)))


async def _object_body(request: Request, srv: Server, limit: int) -> dict:
    """A JSON object body, once the engine (and so the tokenizer) exists."""
    body = await read_json(request, limit)
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    srv.engine()  # the tokenizer exists once the engine does
    return body


def _add_tokenizer_routes(app: FastAPI, srv: Server, limit: int) -> None:
    """/tokenize, /detokenize and /tokenizer_info (vLLM's shapes)."""
    state = srv.s

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await _object_body(request, srv, limit)
        if "messages" in body:
            from .protocol import _messages

            ids = state.tokenizer.apply_chat_template(list(_messages(body["messages"])), tokenize=True,
                                                      add_generation_prompt=bool(body.get("add_generation_prompt", True)))
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("prompt must be a string", "prompt")
            unicode_text(prompt, "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise bad("add_special_tokens must be true or false", "add_special_tokens")
            ids = list(state.tokenizer(prompt, add_special_tokens=special)["input_ids"])
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await _object_body(request, srv, limit)
        from .protocol import _token_ids

        ids = _token_ids(body.get("tokens"), "tokens")
        if any(t >= state.vocab_size for t in ids):
            raise bad(f"token ids must be < {state.vocab_size}", "tokens")
        return {"prompt": state.tokenizer.decode(list(ids))}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        srv.engine()
        tok = state.tokenizer
        return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": tok.pad_token, "chat_template": getattr(tok, "chat_template", None),
                "model_max_length": state.max_model_len}
