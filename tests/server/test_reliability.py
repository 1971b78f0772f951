"""Bad input, lost clients, load, auth and shutdown, over raw HTTP (serving-conventions.md (b), (c))."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import signal
import threading
import time

import httpx
import pytest

from .conftest import Served, start_server

OK = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
BIG = "x" * (9 * 2 ** 20)

BAD = [  # (route, body or raw bytes, headers, status, param)
    ("/v1/completions", b"{{{", None, 400, None),
    ("/v1/completions", b"[]", None, 400, None),
    ("/v1/completions", b"42", None, 400, None),
    ("/v1/completions", b"null", None, 400, None),
    ("/v1/completions", json.dumps(OK).encode(), {"content-type": "text/plain"}, 400, "content-type"),
    ("/v1/completions", json.dumps({"prompt": BIG}).encode(), None, 413, None),
    ("/v1/completions", {"prompt": ""}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": None}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, "a"]}, None, 400, "prompt"),
    ("/v1/chat/completions", {"messages": None}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [123]}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{}]}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": 123}]}, None, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 123}]}, None, 400, "messages"),
    ("/v1/completions", {**OK, "max_tokens": 0}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": -1}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 2.5}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": "8"}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK, "max_tokens": 1024}, None, 400, "max_tokens"),
    ("/v1/completions", {**OK, "prompt": [5] * 1100}, None, 400, "prompt"),
    ("/v1/completions", {**OK, "temperature": -1}, None, 400, "temperature"),
    ("/v1/completions", {**OK, "temperature": "nan"}, None, 400, "temperature"),
    ("/v1/completions", {**OK, "top_p": 0}, None, 400, "top_p"),
    ("/v1/completions", {**OK, "top_p": 1.5}, None, 400, "top_p"),
    ("/v1/completions", {**OK, "top_k": -2}, None, 400, "top_k"),
    ("/v1/completions", {**OK, "top_k": 1.5}, None, 400, "top_k"),
    ("/v1/completions", {**OK, "presence_penalty": 3}, None, 400, "presence_penalty"),
    ("/v1/completions", {**OK, "frequency_penalty": 0.5}, None, 400, "frequency_penalty"),
    ("/v1/completions", {**OK, "n": 0}, None, 400, "n"),
    ("/v1/completions", {**OK, "n": 1000}, None, 400, "n"),
    ("/v1/completions", {**OK, "logprobs": 21}, None, 400, "logprobs"),
    ("/v1/completions", {**OK, "logprobs": -1}, None, 400, "logprobs"),
    ("/v1/completions", {**OK, "logprobs": "3"}, None, 400, "logprobs"),
    ("/v1/completions", {**OK, "stream_options": {"include_usage": True}}, None, 400, "stream_options"),
    ("/v1/completions", {**OK, "model": "gpt-9"}, None, 404, "model"),
    ("/v1/completions", {**OK, "prompt": [10 ** 6]}, None, 400, "prompt"),
    ("/v1/completions", {**OK, "prompt": [-1]}, None, 400, "prompt"),
    ("/v1/completions", {**OK, "seed": 2 ** 64}, None, 400, "seed"),
    ("/v1/completions", {**OK, "stop": ["a"] * 17}, None, 400, "stop"),
    ("/v1/completions", {**OK, "stop": 5}, None, 400, "stop"),
    ("/v1/completions", {**OK, "logit_bias": {"5": 10}}, None, 400, "logit_bias"),
    ("/v1/completions", {**OK, "stride": 9}, None, 400, "stride"),
    ("/v1/completions", {**OK, "mode": "fast"}, None, 400, "mode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, None, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 30}, None, 400, "top_logprobs"),
]


@pytest.mark.parametrize("route,body,headers,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_4xx_with_the_error_shape(server: Served, route, body, headers, status, param) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + route, content=content,
                   headers=headers or {"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["param"] == param
    assert isinstance(err["code"], str) and len(r.text) < 2000
    if "context" in err["message"]:
        assert err["code"] == "context_length_exceeded"
    ok = httpx.post(server.url + "/v1/completions", json=OK, timeout=30)  # the server still serves
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_unknown_routes_and_fields(server: Served) -> None:
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(server.url + "/v1/completions", json={**OK, "frobnicate": 3})  # ignored (and logged)
    assert r.status_code == 200
    assert httpx.get(server.url + "/version").json()["version"]
    t = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert t["count"] == len(t["tokens"]) > 0
    assert httpx.post(server.url + "/detokenize", json={"tokens": t["tokens"]}).json()["prompt"] == "Hello world"


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _wait_idle(url: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = httpx.get(url + "/metrics").text
        if _metric(m, "idlm:num_requests_running") == 0 and _metric(m, "idlm:kv_cache_usage_perc") == 0 \
                and _metric(m, "idlm:num_requests_waiting") == 0 or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def test_metrics_count_what_usage_says(server: Served) -> None:
    before = httpx.get(server.url + "/metrics").text
    r = httpx.post(server.url + "/v1/completions", json={**OK, "max_tokens": 9, "ignore_eos": True}).json()
    after = _wait_idle(server.url)
    assert _metric(after, "idlm:generation_tokens_total") - _metric(before, "idlm:generation_tokens_total") == 9
    assert _metric(after, "idlm:prompt_tokens_total") - _metric(before, "idlm:prompt_tokens_total") == \
        r["usage"]["prompt_tokens"]
    assert _metric(after, "idlm:request_success_total") == _metric(before, "idlm:request_success_total") + 1
    for name in ("idlm:time_to_first_token_seconds_count", "idlm:e2e_request_latency_seconds_count",
                 "idlm:inter_token_latency_seconds_count", "idlm:spec_decode_num_drafts_total",
                 "idlm:spec_decode_num_draft_tokens_total", "idlm:spec_decode_num_accepted_tokens_total",
                 "idlm:num_preemptions_total"):
        assert name in after
    assert re.search(r'idlm:spec_decode_num_accepted_tokens_per_pos_total\{.*position="0"', after)


def _stream_request(url: str, i: int, disconnect: bool) -> str | None:
    body = {"prompt": f"Request {i}:", "max_tokens": 24, "temperature": 0, "stream": True, "ignore_eos": True}
    text = ""
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if disconnect and text:
                return None  # leave mid-stream: the server must abort and free the request
            if line.startswith("data: ") and line != "data: [DONE]":
                text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
    return text


def test_200_requests_32_concurrent_with_disconnects(server: Served) -> None:
    """20% of the clients leave mid-stream; every other request completes with the text it gets alone,
    and afterwards nothing is running and no KV block is in use."""
    alone = {i: httpx.post(server.url + "/v1/completions", timeout=60,
                           json={"prompt": f"Request {i}:", "max_tokens": 24, "temperature": 0,
                                 "ignore_eos": True}).json()["choices"][0]["text"] for i in range(10)}
    with cf.ThreadPoolExecutor(32) as pool:
        futs = {i: pool.submit(_stream_request, server.url, i % 10, i % 5 == 0) for i in range(200)}
        results = {i: f.result() for i, f in futs.items()}
    for i, text in results.items():
        if i % 5:
            assert text == alone[i % 10]
    m = _wait_idle(server.url)
    assert _metric(m, "idlm:num_requests_running") == 0 and _metric(m, "idlm:kv_cache_usage_perc") == 0
    assert _metric(m, "idlm:http_requests_client_disconnected_total") >= 40
    assert httpx.get(server.url + "/health").status_code == 200


def test_queue_bound_answers_503_with_retry_after(tiny_chat_model, tmp_path) -> None:
    s = start_server(tiny_chat_model, tmp_path, "--max-running", "1", "--max-queue", "1")
    try:
        body = {"prompt": "Hi", "max_tokens": 200, "temperature": 0, "ignore_eos": True}
        with cf.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(httpx.post, s.url + "/v1/completions", json=body, timeout=120) for _ in range(6)]
            rs = [f.result() for f in futs]
        codes = sorted(r.status_code for r in rs)
        assert codes.count(200) >= 2 and 503 in codes
        busy = next(r for r in rs if r.status_code == 503)
        assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "server_overloaded"
    finally:
        assert s.stop() == 0


def test_api_key(tiny_chat_model, tmp_path) -> None:
    s = start_server(tiny_chat_model, tmp_path, env={"IDLM_API_KEY": "sekret"})
    try:
        assert httpx.get(s.url + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            r = httpx.post(s.url + "/v1/completions", json=OK, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert httpx.get(s.url + "/metrics", headers=headers).status_code == 401
        r = httpx.post(s.url + "/v1/completions", json=OK, headers={"Authorization": "Bearer sekret"})
        assert r.status_code == 200
    finally:
        s.stop()


def test_sigterm_drains_then_exits_0(tiny_chat_model, tmp_path) -> None:
    """A stream in flight when SIGTERM arrives completes; new requests get 503; the exit status is 0."""
    s = start_server(tiny_chat_model, tmp_path, "--mode", "ar")
    got: dict = {}

    def client():
        body = {"prompt": "Count:", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
        text, lines = "", []
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if line.startswith("data: {"):
                    text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                    got.setdefault("started", True)
        got["lines"], got["text"] = lines, text

    t = threading.Thread(target=client)
    t.start()
    while "started" not in got:
        time.sleep(0.02)
    s.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = httpx.post(s.url + "/v1/completions", json=OK, timeout=10)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    assert httpx.get(s.url + "/health").status_code == 503
    t.join(120)
    assert got["lines"][-1] == "data: [DONE]"
    finals = [json.loads(x[6:])["choices"][0]["finish_reason"] for x in got["lines"] if x.startswith("data: {")]
    assert finals[-1] == "length"
    assert s.proc.wait(60) == 0


def test_bench_over_http_reads_the_engines_own_throughput(server: Served) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "idlm.cli", "bench", "--server", server.url, "--modes", "ar,isd",
                        "--concurrency", "1,2", "--prompts", "3", "--prompt-set", "builtin", "--max-new-tokens", "6"],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])["results"]
    assert [(x["mode"], x["concurrency"]) for x in res] == [("ar", 1), ("isd", 1), ("ar", 2), ("isd", 2)]
    for x in res:
        assert x["requests"] == 3 and x["errors"] == 0 and x["output_tokens_per_s"] > 0
        assert x["ttft_p50_s"] > 0 and 0 < x["http_vs_engine"] <= 1.05
    bad = subprocess.run([sys.executable, "-m", "idlm.cli", "bench", "--server", "http://127.0.0.1:9"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "idlm: error:" in bad.stderr


def test_a_model_that_cannot_load_exits_2_with_one_line() -> None:
    import subprocess
    import sys

    from .conftest import free_port

    r = subprocess.run([sys.executable, "-m", "idlm.cli", "serve", "--model", "/nonexistent/model",
                        "--port", str(free_port())], capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert r.stderr.startswith("idlm: error:") and "/nonexistent/model" in r.stderr


def test_chat_default_max_tokens_fits_a_small_kv_pool(tiny_chat_model, tmp_path) -> None:
    """Chat's default max_tokens is the rest of the context, capped by what the KV pool can hold, so a
    request without max_tokens is served (not refused) when the pool is smaller than the context."""
    s = start_server(tiny_chat_model, tmp_path, "--kv-cache-gb", "0.0001", "--dtype", "fp32")
    try:
        body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "ignore_eos": True}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert r.json()["choices"][0]["finish_reason"] == "length" and 0 < usage["completion_tokens"] < 1024
        too_long = httpx.post(s.url + "/v1/chat/completions", json={**body, "max_tokens": 900}, timeout=30)
        assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    finally:
        s.stop()
