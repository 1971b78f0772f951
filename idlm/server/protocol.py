"""OpenAI request bodies → typed, validated requests (vLLM's field set and defaults).

Everything a client can get wrong is caught here and becomes a 400 naming the field; nothing
reaches the engine unchecked. Fields we cannot honour (penalties, logit_bias, tools, …) are refused
when set to a non-default value rather than silently ignored; fields we do not know are ignored and
reported back to the caller for logging, as vLLM does."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import MAX_LOGPROBS, MAX_STRIDE, MIN_STRIDE
from .errors import bad

MAX_N = 16
MAX_PROMPTS = 64
MAX_STOPS = 16
INT64 = 2 ** 63
ROLES = ("system", "user", "assistant", "developer", "tool")

COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "n", "stream",
          "stream_options", "logprobs", "ignore_eos", "stride", "mode", "user", "presence_penalty",
          "frequency_penalty", "logit_bias", "min_p", "repetition_penalty", "min_tokens"}
COMPLETION_FIELDS = COMMON | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                        "tool_choice", "parallel_tool_calls", "add_generation_prompt"}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated /v1/completions or /v1/chat/completions request (text not yet tokenized)."""

    kind: str  # "completion" | "chat"
    model: str | None  # the name asked for (None = the served model)
    prompts: tuple  # completions: each a str or a tuple of token ids; chat: ()
    messages: tuple  # chat: ({"role", "content"}, ...) with string content; completions: ()
    max_tokens: int | None  # None = the default (completions 16, chat: the rest of the context)
    temperature: float
    top_p: float
    top_k: int  # 0 = off
    seed: int | None
    stop: tuple[str, ...]  # stop strings (text level, cut exactly)
    stop_token_ids: tuple[int, ...]
    n: int
    stream: bool
    include_usage: bool  # stream_options.include_usage
    logprobs: int | None  # alternatives per token (completions: logprobs; chat: top_logprobs if logprobs)
    echo: bool  # completions: prepend the prompt (and score it when logprobs is set)
    ignore_eos: bool
    stride: int | str | None  # idlm: ISD stride N or "auto" (None = the server's)
    mode: str | None  # idlm: "isd" | "ar" (None = the server's)
    unknown: tuple[str, ...]  # fields we do not know (ignored, logged)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer past the float range
        return False


def _num(body: dict, name: str, default: float, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not _finite(v):
        raise bad(f"{name} must be a finite number, got {v!r}"[:200], name)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"{name} must be <= {hi}, got {v}", name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise bad(f"{name} must be an integer, got {v!r}"[:200], name)
    if lo is not None and v < lo:
        raise bad(f"{name} must be at least {lo}, got {v}", name)
    if hi is not None and v > hi:
        raise bad(f"{name} must be at most {hi}, got {v}", name)
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false, got {v!r}"[:200], name)
    return v


def unicode_text(v: str, name: str, param: str | None = None) -> str:
    """``v``, if it is text a tokenizer takes (JSON can carry a lone surrogate, ``"\\ud800"``)."""
    try:
        v.encode()
    except UnicodeEncodeError:
        raise bad(f"{name} must be valid Unicode text (it has a lone surrogate)", param or name) from None
    return v


def _token_ids(v, name: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(_is_int(t) for t in v):
        raise bad(f"{name} must be a list of integer token ids", name)
    if any(t < 0 for t in v):
        raise bad(f"{name}: token ids must be greater than or equal to 0", name)
    return tuple(v)


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop takes at most {MAX_STOPS} strings, got {len(stops)}", "stop")
    return tuple(s for s in stops if s)


def _unsupported(body: dict) -> None:
    """Refuse sampling features idlm does not implement, rather than silently ignoring them."""
    for name in ("presence_penalty", "frequency_penalty"):
        v = _num(body, name, 0.0, -2.0, 2.0)
        if v != 0.0:
            raise bad(f"{name} is not supported by idlm (penalties would change the verified distribution); "
                      "send 0 or omit it", name, "unsupported")
    checks = {"logit_bias": lambda v: not v, "min_p": lambda v: v in (0, 0.0),
              "repetition_penalty": lambda v: v in (1, 1.0), "suffix": lambda v: v in ("",),
              "tools": lambda v: not v, "min_tokens": lambda v: v == 0,
              "response_format": lambda v: isinstance(v, dict) and v.get("type") == "text"}
    for name, ok in checks.items():
        if body.get(name) is not None and not ok(body[name]):
            raise bad(f"{name} is not supported by idlm", name, "unsupported")


def _idlm_fields(body: dict) -> tuple[int | str | None, str | None]:
    stride = body.get("stride")
    if stride is not None and stride != "auto" and not (_is_int(stride) and MIN_STRIDE <= stride <= MAX_STRIDE):
        raise bad(f"stride must be an integer in {MIN_STRIDE}..{MAX_STRIDE} or \"auto\", got {stride!r}"[:200],
                  "stride")
    mode = body.get("mode")
    if mode is not None and mode not in ("isd", "ar"):
        raise bad(f"mode must be \"isd\" or \"ar\", got {mode!r}"[:200], "mode")
    return stride, mode


def _common(body: dict, kind: str) -> dict:
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object", None, "invalid_json")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model must be a string", "model")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise bad("Stream options can only be defined when `stream=True`.", "stream_options")
        if not isinstance(opts, dict):
            raise bad("stream_options must be an object", "stream_options")
    include_usage = bool(opts and _bool(opts, "include_usage"))
    _unsupported(body)
    stride, mode = _idlm_fields(body)
    seed = _int(body, "seed", None, -INT64, INT64 - 1)
    top_k = _int(body, "top_k", 0, -1)
    sti = body.get("stop_token_ids")
    return {"kind": kind, "model": model, "temperature": _num(body, "temperature", 1.0, 0.0),
                "top_p": _num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True), "top_k": max(top_k, 0),
                "seed": None if seed is None else seed % INT64, "stop": _stop(body),
                "stop_token_ids": () if sti is None else _token_ids(sti, "stop_token_ids"),
                "n": _int(body, "n", 1, 1, MAX_N), "stream": stream, "include_usage": include_usage,
                "ignore_eos": _bool(body, "ignore_eos"), "stride": stride, "mode": mode}


def parse_completion(body) -> GenerationRequest:
    c = _common(body, "completion")
    prompts = _prompts(body.get("prompt"))
    echo = _bool(body, "echo")
    max_tokens = _int(body, "max_tokens", None, 0)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens must be at least 1 (0 is only allowed with echo, to score the prompt)", "max_tokens")
    best_of = body.get("best_of")
    if best_of is not None and best_of != c["n"]:
        raise bad("best_of is not supported by idlm (it must equal n or be omitted)", "best_of", "unsupported")
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    unknown = tuple(sorted(set(body) - COMPLETION_FIELDS))
    return GenerationRequest(prompts=prompts, messages=(), max_tokens=max_tokens, logprobs=logprobs, echo=echo,
                             unknown=unknown, **c)


def _prompts(p) -> tuple:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if p is None or p == "" or p == []:
        raise bad("prompt must be provided and non-empty", "prompt")
    if isinstance(p, str):
        return (unicode_text(p, "prompt"),)
    if not isinstance(p, list):
        raise bad("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                  "token ids", "prompt")
    if all(_is_int(t) for t in p):
        return (_token_ids(p, "prompt"),)
    if len(p) > MAX_PROMPTS:
        raise bad(f"at most {MAX_PROMPTS} prompts per request, got {len(p)}", "prompt")
    out = []
    for x in p:
        if isinstance(x, str) and x:
            out.append(unicode_text(x, "prompt"))
        elif isinstance(x, list) and x:
            out.append(_token_ids(x, "prompt"))
        else:
            raise bad("each prompt in the list must be a non-empty string or a non-empty list of token ids",
                      "prompt")
    return tuple(out)


def parse_chat(body) -> GenerationRequest:
    c = _common(body, "chat")
    messages = _messages(body.get("messages"))
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    max_tokens = _int(body, "max_tokens", max_tokens, 1)
    want = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want:
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    unknown = tuple(sorted(set(body) - CHAT_FIELDS))
    return GenerationRequest(prompts=(), messages=messages, max_tokens=max_tokens,
                             logprobs=(top or 0) if want else None, echo=False, unknown=unknown, **c)


def _messages(msgs) -> tuple:
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", "messages")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", "messages")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise bad(f"messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                          "supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": role, "content": unicode_text(content, f"messages[{i}].content", "messages")})
    return tuple(out)
