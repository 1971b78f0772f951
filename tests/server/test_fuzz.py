"""API fuzzing (serving-conventions.md, "where we can exceed the references" 2-3): thousands of generated
requests against every route of a running server: mostly-valid bodies with one field mutated, fully random
JSON, raw bytes (truncated, non-JSON, deep nesting, bare NaN tokens, duplicated keys, lone surrogates),
wrong Content-Types, huge headers and wrong methods. Every answer must be a 2xx, or a 4xx in the one error
shape; never a 5xx, a dropped connection, a timeout or a traceback in the server's log; /health is 200 after.

The default run is deterministic (``derandomize``); ``IDLM_FUZZ_EXAMPLES=20000`` runs a longer one."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import Served, start_server

EXAMPLES = int(os.environ.get("IDLM_FUZZ_EXAMPLES", "2500"))
VOCAB = 49152  # the tiny chat model's vocabulary (the default model's tokenizer)
MAX_GEN = 4  # valid generation requests stay this short, so the run stays fast

ROUTES = {("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/tokenize"),
          ("POST", "/detokenize"), ("GET", "/health"), ("GET", "/version"), ("GET", "/v1/models"),
          ("GET", "/metrics"), ("GET", "/tokenizer_info"), ("GET", "/")}
UNKNOWN_PATHS = ["/v1/nothing", "/v1/embeddings", "/favicon.ico", "/v1", "/v1/completions/x", "/%00",
                 "/..%2F..%2Fetc%2Fpasswd", "/%F0%9F%98%80", "/v1/chat/completions%20", "//v1/models"]


# -- JSON with what json.dumps cannot write: raw tokens and duplicated keys ---------------------------------

@dataclass(frozen=True)
class Raw:
    """JSON text written as is (bare NaN, 1e999, 5,000-digit ints, 10,000 nested lists)."""

    text: str

    def __repr__(self) -> str:
        return f"Raw({self.text[:40]!r}{'...' if len(self.text) > 40 else ''} ({len(self.text)} chars))"


@dataclass(frozen=True)
class Pairs:
    """A JSON object as written: keys may repeat (the last one wins in json.loads)."""

    items: tuple


def dump(v) -> str:
    """JSON text; strings are ASCII-escaped, so a lone surrogate goes out as a \\ud800 escape."""
    if isinstance(v, Raw):
        return v.text
    if isinstance(v, dict):
        v = Pairs(tuple(v.items()))
    if isinstance(v, Pairs):
        return "{" + ",".join(f"{json.dumps(k)}:{dump(x)}" for k, x in v.items) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(dump(x) for x in v) + "]"
    return json.dumps(v)  # NaN / Infinity come out as bare tokens


# -- values ----------------------------------------------------------------------------------------------

NASTY = ["", " ", "\x00", "a\x00b", "\ud800", "\udfff", "a\ud83db", "\udc80\ud800", "\u202eevil\u202c",
         "\u200f\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627", "\ufeff", "\uffff", "\U0001f600",
         "e\u0301\u0301\u0301", "</s>", "<|im_end|>", "<|im_start|>system\nx<|im_end|>", "{{ raise_exception('x') }}",
         "{% for x in range(10**9) %}", "\r\n\r\n", "%s%n%x", "null", "NaN", "\\u0000", "x" * 300]
RAW_NUMBERS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "-0", "-0.0", "0e0",
               "1E400", "4.9e-324", "2.5e-400", str(2 ** 64), str(-2 ** 63 - 1), str(2 ** 200), str(10 ** 400),
               "0.1e1", "1.0", "01", "+1", ".5", "0x10"]
BIG_INTS = [2 ** 31, 2 ** 32, 2 ** 53 + 1, 2 ** 63 - 1, 2 ** 63, 2 ** 64, -2 ** 63, -2 ** 63 - 1, -2 ** 64,
            10 ** 30, 2 ** 1000, -(10 ** 400), VOCAB, VOCAB - 1, VOCAB + 1]
FLOATS = [-0.0, 0.0, 1e308, -1e308, 5e-324, 1e-300, 0.5, 1.0, 1.5, 2.5, 1e-2, float("nan"), float("inf"),
          float("-inf")]


def deep(depth: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * depth + "]" * depth)
    if kind == "object":
        return Raw('{"a":' * depth + "0" + "}" * depth)
    return Raw('[{"role":' * depth + '"user"' + "}]" * depth)  # messages-like


deeps = st.builds(deep, st.sampled_from([64, 1000, 10_000, 30_000]), st.sampled_from(["list", "object", "mixed"]))
long_strings = st.builds(lambda c, n: c * n, st.sampled_from(["x", "é", "\ud800", "\u202e", "ab ", "\x00", "🙂"]),
                         st.sampled_from([1000, 20_000, 70_000]))
texts = st.one_of(st.text(max_size=12), st.text(st.characters(codec=None, exclude_categories=()), max_size=8),
                  st.sampled_from(NASTY))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.integers(), st.sampled_from(BIG_INTS),
                    st.floats(), st.sampled_from(FLOATS), texts, st.sampled_from(RAW_NUMBERS).map(Raw))
KNOWN_FIELDS = sorted({"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
                       "top_p", "top_k", "seed", "stop", "stop_token_ids", "n", "stream", "stream_options",
                       "logprobs", "top_logprobs", "echo", "ignore_eos", "stride", "mode", "user", "best_of",
                       "suffix", "presence_penalty", "frequency_penalty", "logit_bias", "min_p",
                       "repetition_penalty", "min_tokens", "response_format", "tools", "tool_choice",
                       "parallel_tool_calls", "add_generation_prompt", "add_special_tokens", "tokens",
                       "role", "content", "type", "text", "include_usage"})
keys = st.one_of(st.sampled_from(KNOWN_FIELDS), texts)
json_values = st.recursive(
    st.one_of(scalars, scalars, scalars, scalars, scalars, long_strings, deeps),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(keys, kids, max_size=4),
                           st.lists(st.tuples(keys, kids), max_size=4).map(lambda x: Pairs(tuple(x)))),
    max_leaves=8)

MESSAGE_VALUES = [
    [], {}, "hi", [None], [[]], [{"role": "user"}], [{"content": "x"}], [{"role": "assistant", "content": None}],
    [{"role": "tool", "content": "x"}], [{"role": "developer", "content": "x"}], [{"role": "USER", "content": "x"}],
    [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}], [{"role": "assistant", "content": "a"}],
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": [{"type": "text"}]}],
    [{"role": "user", "content": []}], [{"role": "user", "content": [[]]}], [{"role": ["user"], "content": "x"}],
    [{"role": {"a": 1}, "content": "x"}], [{"role": "user", "content": "x", "name": 5, "tool_calls": [1]}],
    [{"role": "user", "content": {"type": "text", "text": "x"}}], [{"role": "user", "content": "\ud800"}],
    [{"role": "user", "content": "x" * 5000}], [{"role": "user", "content": "hi"}] * 300,
    [Pairs((("role", "user"), ("role", 5), ("content", "x")))], [{"role": "user", "content": "\x00"}],
]
PROMPT_VALUES = [
    [VOCAB], [VOCAB - 1], [2 ** 31], [2 ** 63], [2 ** 64], [2 ** 200], [-1], [-(2 ** 64)], [[1, 2], [2 ** 70]],
    [[1], [VOCAB]], [[]], [[1], "a"], ["a", ""], ["a"] * 65, ["a"] * 64, [0] * 1100, [5] * 1000, [True], [1.0],
    [[[1]]], [None], [-0.0], [[1, 2]] * 3, "\ud800", "a\ud800", ["\udfff"], "\x00", "<|im_end|>", "x" * 100_000,
    [Raw("1e999")], [Raw("NaN")], {"text": "x"},
]
GEN_INTS = [-(2 ** 64), -1, 0, 1, MAX_GEN, 1024, 1025, 2 ** 31, 2 ** 63, 2 ** 64, 1.0, 2.5, "4", True, False, None,
            Raw("4.0"), Raw("1e999"), Raw("NaN"), Raw(str(10 ** 400))]
SPECIFIC = {  # known fields: the values most likely to slip through (edges, wrong types that look right)
    "prompt": PROMPT_VALUES, "messages": MESSAGE_VALUES, "tokens": PROMPT_VALUES + [[], [1, 2, 3]],
    "max_tokens": GEN_INTS, "max_completion_tokens": GEN_INTS,
    "n": [0, -1, 2, 16, 17, 2 ** 64, True, 2.0, "2", None],
    "stream": [True, False, "true", 1, 0, None, [], {}],
    "stream_options": [{"include_usage": True}, {"include_usage": "yes"}, {"include_usage": None}, [], "x", {},
                       {"continuous_usage_stats": True}, Pairs((("include_usage", True), ("include_usage", 1)))],
    "logprobs": [0, 1, 20, 21, -1, 2 ** 64, -(2 ** 64), True, False, 1.0, "1", None, [1], Raw("NaN")],
    "top_logprobs": [0, 1, 20, 21, -1, 2 ** 64, True, 1.5, "1", None],
    "echo": [True, False, 1, "yes", None],
    "stop": [["a", 1], [None], [["x"]], ["a"] * 16, ["a"] * 17, [""], ["\ud800"], "\ud800", {"a": 1}, [], "",
             ["\x00"], ["<|im_end|>", "\n"], 5, True, ["x" * 100_000], [" ", "e", "a", "t", "o"]],
    "stop_token_ids": [[VOCAB], [2 ** 64], [-1], [True], "1", [1.5], [], [0, 1, 2], [2] * 1000, [[1]]],
    "seed": [2 ** 63, 2 ** 63 - 1, -(2 ** 63), -(2 ** 63) - 1, -1, 0, 2 ** 64, 1.0, "1", True],
    "temperature": [0, 0.0, -0.0, 1e-300, 5e-324, 1e-2, 1, 2, 1e308, -1e-300, 10 ** 400, Raw("NaN"), Raw("Infinity"),
                    Raw("1e999"), "0", True],
    "top_p": [0, 5e-324, 1e-300, 0.5, 1, 1.0000001, -0.0, 2 ** 64, 10 ** 400, Raw("NaN"), True],
    "top_k": [-2, -1, 0, 1, 2, VOCAB, VOCAB + 1, 2 ** 31, 2 ** 63, 2 ** 64, 1.0, True, "5"],
    "stride": [0, 1, 2, 8, 9, "auto", "AUTO", "3", 2.0, True, -(2 ** 64), 2 ** 64],
    "mode": ["ar", "isd", "fast", "", None, 1, ["ar"]],
    "best_of": [1, 2, 0, None, "1", 2 ** 64, True],
    "presence_penalty": [0, 0.0, -0.0, 1, 2, -2, 2.0000001, 10 ** 400, Raw("NaN"), True, "0"],
    "frequency_penalty": [0, -0.0, 3, 10 ** 400, Raw("-Infinity"), None],
    "logit_bias": [{}, {"5": 10}, {"\ud800": 1}, [], None, 0, "x"],
    "min_p": [0, 0.0, 0.1, None, "0", [0], 10 ** 400, Raw("NaN")],
    "repetition_penalty": [1, 1.0, 0, -1, None, 10 ** 400, Raw("NaN")],
    "min_tokens": [0, 1, -1, 2 ** 64, None, False],
    "response_format": [{"type": "text"}, {"type": "json_object"}, {"type": ["text"]}, "text", {}, [], None],
    "tools": [[], None, [{"type": "function"}], {}, "x"],
    "suffix": ["", None, "x", 5],
    "model": ["model", "gpt-9", "", "\ud800", "x" * 5000, 5, None, ["model"], {"id": "model"}],
    "ignore_eos": [True, False, 1, "true"],
    "add_special_tokens": [True, False, 1, "false", None], "add_generation_prompt": [True, False, 0, "x", None],
}


@functools.cache
def field_values(name: str):
    generic = json_values
    if name in ("max_tokens", "max_completion_tokens"):  # no valid long generations from generic values
        generic = json_values.filter(lambda v: not (isinstance(v, int) and MAX_GEN < v < 1025))
    if name in SPECIFIC:
        return st.one_of(st.sampled_from(SPECIFIC[name]), generic)
    return generic


# -- mostly-valid bodies ---------------------------------------------------------------------------------

MSG = [{"role": "user", "content": "Hi"}]
OPTIONAL = {"model": st.just("model"), "temperature": st.sampled_from([0, 0.7, 1.0]), "top_p": st.just(0.9),
            "top_k": st.integers(0, 50), "seed": st.integers(0, 2 ** 63 - 1), "n": st.integers(1, 3),
            "stop": st.sampled_from([["\n"], "x", []]), "stop_token_ids": st.just([2]),
            "stride": st.sampled_from([2, 3, 8, "auto"]), "mode": st.sampled_from(["isd", "ar"]),
            "ignore_eos": st.booleans(), "stream": st.booleans(), "user": st.just("u"),
            "presence_penalty": st.just(0), "logit_bias": st.just({}), "min_p": st.just(0)}
OPT_CHAT = OPTIONAL | {"logprobs": st.booleans(), "response_format": st.just({"type": "text"})}
OPT_COMPLETION = OPTIONAL | {"logprobs": st.integers(0, 2), "echo": st.booleans(), "best_of": st.just(1)}


NAMES_CHAT, NAMES_COMPLETION = (st.lists(st.sampled_from(sorted(o)), max_size=5, unique=True)
                                for o in (OPT_CHAT, OPT_COMPLETION))
LENGTHS, BOOLS, SMALL = st.integers(1, MAX_GEN), st.booleans(), st.integers(0, 2)
POS = st.integers(0, 2 ** 20)  # an index, taken modulo what it indexes (one strategy for every draw)
PROMPTS = st.sampled_from(["Hello", [1, 2, 3], ["a", "b"], [[5, 6], "x"]])


@st.composite
def valid_bodies(draw, path: str) -> dict:
    """A valid body for ``path`` with a few optional settings (so a later field's validation runs)."""
    if path == "/tokenize":
        if draw(BOOLS):
            return {"messages": MSG, "add_generation_prompt": draw(BOOLS)}
        return {"prompt": draw(st.sampled_from(["Hello world", "é 🙂 \u202e"])), "add_special_tokens": draw(BOOLS)}
    if path == "/detokenize":
        return {"tokens": draw(st.lists(st.integers(0, VOCAB - 1), max_size=5))}
    chat = path == "/v1/chat/completions"
    n = draw(LENGTHS)
    body = {"messages": MSG, "max_tokens": n, "max_completion_tokens": n} if chat else \
        {"prompt": draw(PROMPTS), "max_tokens": n}
    opt = OPT_CHAT if chat else OPT_COMPLETION
    for name in draw(NAMES_CHAT if chat else NAMES_COMPLETION):
        body[name] = draw(opt[name])
    if chat and body.get("logprobs") and draw(BOOLS):
        body["top_logprobs"] = draw(SMALL)
    if body.get("stream") and draw(BOOLS):
        body["stream_options"] = {"include_usage": draw(BOOLS)}
    if body.get("n", 1) > 1 and body.get("best_of"):
        body["best_of"] = body["n"]
    return body


HOW = st.sampled_from(["set", "set", "set", "delete", "duplicate", "duplicate-first"])
WHICH = st.sampled_from(["own", "own", "known", "any"])


@st.composite
def mutated(draw, path: str):
    """A valid body with one field replaced, deleted, duplicated with a bad value, or added."""
    body = draw(valid_bodies(path))
    which = draw(WHICH)
    name = sorted(body)[draw(POS) % len(body)] if which == "own" else \
        draw(st.sampled_from(KNOWN_FIELDS)) if which == "known" else draw(keys)
    how = draw(HOW)
    if how == "delete":
        if name not in ("max_tokens", "max_completion_tokens"):  # chat would default to the rest of the context
            body.pop(name, None)
        return body
    value = draw(field_values(name))
    if how == "set":
        body[name] = value
        return body
    pairs = list(body.items())
    return Pairs(tuple(pairs + [(name, value)] if how == "duplicate" else [(name, value)] + pairs))


# -- requests --------------------------------------------------------------------------------------------

@dataclass
class Req:
    method: str
    path: str
    headers: list
    content: bytes | None
    query: str = ""

    def __repr__(self) -> str:
        c = self.content if self.content is None or len(self.content) < 300 else \
            self.content[:300] + b"... (%d bytes)" % len(self.content)
        hs = [(k, v if len(v) < 80 else f"{v[:20]}... ({len(v)} chars)") for k, v in self.headers]
        q = self.query if len(self.query) < 40 else f"{self.query[:20]}... ({len(self.query)} chars)"
        return f"Req({self.method} {self.path}{q} headers={hs[:6]}{'...' if len(hs) > 6 else ''} body={c!r})"


CONTENT_TYPES = ["application/json; charset=utf-8", "APPLICATION/JSON", "application/json;",
                 "application/json ; charset=utf-8", "application/json; charset=latin-1",
                 "application/json; charset=utf-16", "text/plain", "", "*/*", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/jsonx", "application/json, text/plain",
                 "application/ld+json", "text/json", "json", ";", "\xe9", "a" * 5000, None]
EXTRA_HEADERS = [
    *[[("x-fuzz", "a" * k)] for k in (1000, 4000, 8000, 16_000, 32_000, 60_000)],  # one header, 1 .. 60 KB
    *[[(f"x-fuzz-{i}", "v" * 100) for i in range(k)] for k in (10, 100, 500)],  # many, up to 60 KB together
    [("authorization", "Bearer \xff")], [("accept", "text/event-stream")], [("content-encoding", "gzip")],
    [("accept-encoding", "br;q=2")], [("x-request-id", "\xe9" * 100)], [("cookie", "a=" + "b" * 3000)],
    [("content-type", "text/plain")],  # a second Content-Type
]
headers = st.builds(lambda ct, extra: ([] if ct is None else [("content-type", ct)]) + extra,
                    st.sampled_from(["application/json"] * 20 + CONTENT_TYPES),
                    st.sampled_from([[]] * 20 + EXTRA_HEADERS))
queries = st.sampled_from([""] * 16 + ["?stream=true", "?a=1&a=2", "?%00=%ff", "?x=" + "y" * 4000])


def encode(text: str, ctype: str | None) -> bytes:
    if ctype and "utf-16" in ctype:
        return text.encode("utf-16")
    return text.encode()


RAW_KIND = st.sampled_from(["empty", "scalar", "truncated", "bytes", "garbage", "deep", "encoded"])
EMPTY = st.sampled_from([b"", b" ", b"\n", b"\x00", b"{}", b"[]", b"null", b"0", b'""', b"{", b"}"])
BAD_BYTES = st.one_of(st.binary(max_size=64), st.sampled_from(
    [b"\xff\xfe{", b'{"prompt": "\xe9"}', b'{"prompt": "\xed\xa0\x80"}', b'\xef\xbb\xbf{"prompt": "a"}',
     b'{"prompt": "a"}\x00', b"\xc0\x80", b'{"prompt":"a"}' * 2, b"{'prompt': 'a'}", b'{"prompt": "a" // c\n}',
     b'{"prompt": "a",}', b"[1,]", b'{"a" 1}']))
JUNK = st.sampled_from(["}", "]", ",", ":", '"', "\\", "\\u", "\\ud800", " x", "\x00", "NaN", "{", "[" * 5000])


@st.composite
def raw_bodies(draw, path: str) -> bytes:
    kind = draw(RAW_KIND)
    if kind == "empty":
        return draw(EMPTY)
    if kind == "scalar":
        return dump(draw(scalars)).encode()
    if kind == "bytes":
        return draw(BAD_BYTES)
    if kind == "deep":
        return draw(deeps).text.encode()
    text = dump(draw(valid_bodies(path)))
    if kind == "truncated":
        return text.encode()[:draw(POS) % len(text)]
    if kind == "garbage":  # something inserted into a valid body
        at = draw(POS) % (len(text) + 1)
        return (text[:at] + draw(JUNK) + text[at:]).encode()
    return text.encode("utf-16")


@functools.cache
def posts(path: str):
    bodies = st.one_of(mutated(path), mutated(path), mutated(path), mutated(path), mutated(path), mutated(path),
                       valid_bodies(path),
                       st.dictionaries(keys, json_values, max_size=6),  # random objects
                       json_values,  # any JSON at all
                       raw_bodies(path), raw_bodies(path))

    def make(body, h: list, query: str) -> Req:
        ctype = next((v for k, v in h if k == "content-type"), None)
        return Req("POST", path, h, body if isinstance(body, bytes) else encode(dump(body), ctype), query)

    return st.builds(make, bodies, headers, queries)


METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE")
gets = st.builds(lambda path, content, h, q: Req("GET", path, h, content, q),
                 st.sampled_from(sorted(p for m, p in ROUTES if m == "GET")),
                 st.sampled_from([None] * 6 + [b"", b"{}", b"\xff" * 100]), headers, queries)
wrong_methods = st.builds(lambda route, k, content, h: Req(
    [x for x in METHODS if x != route[0]][k % (len(METHODS) - 1)], route[1], h, content),
    st.sampled_from(sorted(ROUTES)), POS, st.sampled_from([None, b"{}", b'{"prompt": "a"}']), headers)
unknown = st.builds(lambda method, path, h: Req(method, path, h, None), st.sampled_from(["GET", "POST"]),
                    st.sampled_from(UNKNOWN_PATHS), headers)
requests = st.one_of(*[posts(p) for m, p in sorted(ROUTES) if m == "POST"] * 3, gets, wrong_methods, unknown)


# -- checks ----------------------------------------------------------------------------------------------

def check(req: Req, r: httpx.Response) -> None:
    """2xx, or 4xx in the one error shape; SSE streams end with [DONE] and carry no error."""
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, f"{r.status_code} {r.text[:500]}"
    if req.method == "HEAD":
        return
    if r.status_code >= 400:
        assert r.headers.get("content-type", "").startswith("application/json"), r.text[:300]
        body = r.json()
        assert isinstance(body, dict) and set(body) == {"error"}, r.text[:300]
        err = body["error"]
        assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, r.text[:300]
        assert isinstance(err["message"], str) and 0 < len(err["message"]) <= 1000, r.text[:300]
        assert isinstance(err["type"], str) and err["type"].endswith("_error"), r.text[:300]
        assert err["param"] is None or isinstance(err["param"], str), r.text[:300]
        assert isinstance(err["code"], str) and err["code"], r.text[:300]
        return
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [x for x in r.text.split("\n\n") if x]
        assert events and events[-1] == "data: [DONE]", r.text[-300:]
        for e in events[:-1]:
            assert e.startswith("data: {") and "error" not in json.loads(e[6:]), e[:300]
    elif r.headers.get("content-type", "").startswith("application/json"):
        assert isinstance(r.json(), dict)


def send(client: httpx.Client, url: str, req: Req) -> httpx.Response:
    hs = [(k, v.encode("latin-1")) for k, v in req.headers]  # header bytes as sent, not httpx's ASCII check
    return client.request(req.method, url + req.path + req.query, content=req.content, headers=hs)


@pytest.fixture(scope="module")
def fuzz_server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = start_server(tiny_chat_model, tmp_path_factory.mktemp("fuzz"), "--dtype", "fp32", "--max-running", "8",
                     "--stride", "3", "--served-model-name", "model")  # the name valid bodies send
    try:
        yield s
    finally:
        s.stop()


def test_the_fuzzer_knows_every_route() -> None:
    from idlm.config import ServerConfig
    from idlm.server.app import ServerState, build_app

    app = build_app(ServerState(ServerConfig(), "model")).app
    routes = {(m, r.path) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    assert routes == ROUTES


def test_fuzz_every_route(fuzz_server: Served) -> None:
    seen: Counter = Counter()
    start = fuzz_server.log.stat().st_size
    with httpx.Client(timeout=httpx.Timeout(30.0)) as client:
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None, print_blob=False,
                  suppress_health_check=list(HealthCheck))
        @given(req=requests)
        def one(req: Req) -> None:
            r = send(client, fuzz_server.url, req)
            check(req, r)
            seen[(req.method, req.path, r.status_code // 100)] += 1

        one()
        assert client.get(fuzz_server.url + "/health").status_code == 200
    with fuzz_server.log.open("rb") as f:
        f.seek(start)
        log = f.read().decode(errors="replace")
    for bad in ("Traceback", "Exception in ASGI application", "Invalid HTTP request"):
        assert bad not in log, log[-3000:]
    assert sum(seen.values()) >= EXAMPLES * 0.9
    if EXAMPLES >= 1000:  # every route was reached, and the body routes both served and refused
        for m, p in ROUTES:
            assert seen[(m, p, 2)] + seen[(m, p, 4)] > 0, (m, p)
        for p in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
            assert seen[("POST", p, 2)] >= 10 and seen[("POST", p, 4)] >= 100, (p, dict(seen))


# -- what the fuzzer found (each was a 500, a 503 or an unclear 400 before its fix) ----------------------------

MSGS = [{"role": "user", "content": "Hi"}]
FOUND = [  # (route, body: JSON or raw bytes, status, param, what the message says)
    ("/v1/completions", b"[" * 10_000 + b"]" * 10_000, 400, None, "nested too deeply"),  # RecursionError
    ("/tokenize", b'{"prompt": ' + b'{"a":' * 5000 + b"0" + b"}" * 5001, 400, None, "nested too deeply"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 10 ** 400}, 400, "temperature",
     "finite number"),  # math.isnan(int): OverflowError
    ("/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "top_p": 2 ** 1100}, 400, "top_p", "finite"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "presence_penalty": -(10 ** 400)}, 400,
     "presence_penalty", "finite number"),
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 2}, 400, "prompt", "lone surrogate"),  # TypeError
    ("/v1/completions", {"prompt": ["a", "b\udfff"], "max_tokens": 2}, 400, "prompt", "lone surrogate"),
    ("/tokenize", {"prompt": "\ud800"}, 400, "prompt", "lone surrogate"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc80"}]}]}, 400,
     "messages", "messages[0].content must be valid Unicode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}], "max_tokens": 2}, 400,
     "messages", "lone surrogate"),  # was a 400 quoting the tokenizer's TypeError
    ("/v1/completions", {"prompt": [2 ** 64], "max_tokens": 2}, 400, "prompt", "[0, 49152)"),  # decode: Overflow
    ("/v1/completions", {"prompt": [[1, 2], [2 ** 63]], "max_tokens": 2}, 400, "prompt", "[0, 49152)"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "model": "\ud800"}, 404, "model",
     "`\\ud800`"),  # rendering the message: UnicodeEncodeError
    ("/v1/completions", {"prompt": ["a"] * 64, "max_tokens": 1, "n": 2}, 400, "n",
     "128 choices"),  # was 503 + Retry-After on an idle server
]


@pytest.mark.parametrize("route,body,status,param,says", FOUND, ids=[str(i) for i in range(len(FOUND))])
def test_what_the_fuzzer_found(fuzz_server: Served, route, body, status, param, says) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # \ud800 goes out escaped
    with httpx.Client(timeout=30) as client:
        r = client.post(fuzz_server.url + route, content=content, headers={"content-type": "application/json"})
        check(Req("POST", route, [], content), r)
        err = r.json()["error"]
        assert r.status_code == status and err["param"] == param and says in err["message"], r.text
        ok = client.post(fuzz_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200  # and on the same connection: it was not dropped


def test_headers_past_16_kib_in_several_segments(fuzz_server: Served) -> None:
    """A 30 KB header that arrives in pieces (as over any real network) is read, not answered with
    h11's plain-text 400 and a closed connection."""
    import socket
    import time

    host, port = fuzz_server.url.removeprefix("http://").split(":")
    head = f"GET /health HTTP/1.1\r\nHost: {host}\r\nX-Big: {'a' * 30_000}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(head), 8000):
            sock.sendall(head[i:i + 8000])
            time.sleep(0.05)
        assert sock.recv(200).startswith(b"HTTP/1.1 200 ")
