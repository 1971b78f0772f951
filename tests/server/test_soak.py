"""The soak test (`make soak`, idlm/eval/soak.py): its pure helpers without a server, then its core
for 20 s against a real `idlm serve` (the tiny chat model; the default model in the slow test)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from idlm.eval import soak
from idlm.eval.soak import Bucket, EndState, Outcome, ProcSample, SoakConfig, SoakReport

bucketize, end_state, evaluate_targets = soak.bucketize, soak.end_state, soak.evaluate_targets
format_report, parse_prometheus, parse_proc_status = soak.format_report, soak.parse_prometheus, soak.parse_proc_status
stop_cut_problem, summarize = soak.stop_cut_problem, soak.summarize

PROC_STATUS = """Name:\tpython
State:\tS (sleeping)
VmPeak:\t 2818884 kB
VmRSS:\t 1705696 kB
RssAnon:\t 1500000 kB
Threads:\t9
"""

METRICS = """# HELP idlm:num_requests_running Requests holding KV blocks (prefilling or decoding).
# TYPE idlm:num_requests_running gauge
idlm:num_requests_running{model_name="m"} 0.0
idlm:num_requests_waiting{model_name="m"} 1.0
idlm:kv_cache_usage_perc{model_name="m"} 0.125
idlm:http_requests_client_disconnected_total{model_name="m"} 7.0
idlm:request_success_total{finished_reason="stop",model_name="m"} 3.0
idlm:request_success_total{finished_reason="length",model_name="m"} 4.0
"""


def report(**over) -> SoakReport:
    """A passing report; ``over`` replaces fields."""
    r = SoakReport(minutes=1.0, clients=2, model="m", max_model_len=1024, load_s=60.0, requests=10, served=9,
                   hangups=1, expected_errors=0, completion_tokens=100, scenarios={}, status_counts={"200": 9},
                   errors_by_code={}, client_exceptions={}, invalid_responses=0, invalid_examples=[],
                   samples=[ProcSample("start", 0, 500.0, 8), ProcSample("middle", 30, 520.0, 8),
                            ProcSample("end", 61, 530.0, 9)],
                   end=EndState(0.0, None, 0.0, 0.0, 1.0, 0.1, 200, 16), buckets=[], server_exit_code=0)
    r = dataclasses.replace(r, **over)
    r.targets = evaluate_targets(r)
    return r


def failed(r: SoakReport) -> set[str]:
    return {t.name for t in r.targets if not t.ok}


def test_parse_proc_status() -> None:
    rss, threads = parse_proc_status(PROC_STATUS)
    assert rss == pytest.approx(1705696 / 1024) and threads == 9
    with pytest.raises(ValueError):
        parse_proc_status("Name:\tx\n")


def test_parse_prometheus_and_end_state() -> None:
    m = parse_prometheus(METRICS)
    assert m["idlm:request_success_total"] == 7.0  # summed over label sets
    e = end_state(m, 1.5)
    assert (e.running, e.waiting, e.kv_cache_usage_perc, e.client_disconnects) == (0.0, 1.0, 0.125, 7.0)
    assert e.kv_blocks_in_use is None and e.settle_s == 1.5 and not soak.is_idle(e)
    e2 = end_state(parse_prometheus(METRICS + 'idlm:kv_cache_blocks_used{model_name="m"} 3\n'))
    assert e2.kv_blocks_in_use == 3
    idle = METRICS.replace("waiting{model_name=\"m\"} 1.0", "waiting{model_name=\"m\"} 0").replace("0.125", "0")
    assert soak.is_idle(end_state(parse_prometheus(idle)))


def test_bucketize() -> None:
    outs = [Outcome("a", 200, completion_tokens=10, end_s=-1.0, latency_s=3.0),  # warm-up: left out
            Outcome("a", 200, completion_tokens=30, end_s=5.0, latency_s=5.0),
            Outcome("a", 200, completion_tokens=20, end_s=40.0, latency_s=20.0),  # half in each bucket
            Outcome("a", 400, expected_status=400, end_s=12.0),  # not answered: no tokens
            Outcome("a", None, hangup=True, end_s=13.0),
            Outcome("a", 200, completion_tokens=8, end_s=44.0)]  # an instant answer in the short last bucket
    samples = [ProcSample("t+30", 30.0, 600.0, 8), ProcSample("end", 45.0, 610.0, 9)]
    b = bucketize(outs, 30.0, 45.0, samples)
    assert b == [Bucket(0.0, 30.0, 1, 40, round(40 / 30, 2), 600.0, 8), Bucket(30.0, 45.0, 2, 18, 1.2, 610.0, 9)]
    assert bucketize(outs, 30.0, 0.0) == []


def test_summarize_separates_expected_errors_hangups_and_failures() -> None:
    outs = [Outcome("ok", 200, completion_tokens=5, end_s=1.0, latency_s=1.0),
            Outcome("ok", 200, completion_tokens=5, end_s=2.0, latency_s=3.0),
            Outcome("over", 400, expected_status=400, end_s=2.0),
            Outcome("hang", None, hangup=True, end_s=3.0),
            Outcome("bad", 500, end_s=3.0),
            Outcome("gone", None, exception="RemoteProtocolError", end_s=4.0),
            Outcome("odd", 200, problem="stream ended without [DONE]", end_s=4.0)]
    s = summarize(outs)
    assert s["requests"] == 7 and s["served"] == 3 and s["hangups"] == 1 and s["expected_errors"] == 1
    assert s["status_counts"] == {"200": 3, "400": 1, "500": 1} and s["errors_by_code"] == {"500": 1}
    assert s["client_exceptions"] == {"RemoteProtocolError": 1}
    assert s["invalid_responses"] == 1 and s["invalid_examples"] == ["odd: stream ended without [DONE]"]
    assert s["scenarios"]["ok"].requests == 2 and s["scenarios"]["ok"].latency_max_s == 3.0
    assert s["completion_tokens"] == 10


def test_targets_pass_and_each_failure() -> None:
    assert report().passed and not failed(report())
    assert failed(report(errors_by_code={"503": 1})) == {"no 5xx"}
    assert failed(report(errors_by_code={"422": 2})) == {"no unexpected status"}
    assert failed(report(client_exceptions={"ReadError": 1})) == {"no dropped connections"}
    assert failed(report(invalid_responses=1, invalid_examples=["x"])) == {"responses well formed"}
    grow = [ProcSample("middle", 30, 500.0, 8), ProcSample("end", 60, 551.0, 8)]
    assert failed(report(samples=grow)) == {"RSS end <= middle + 10%"}
    assert not failed(report(samples=[ProcSample("middle", 30, 500.0, 8), ProcSample("end", 60, 549.0, 10)]))
    assert failed(report(samples=[ProcSample("middle", 30, 500.0, 8), ProcSample("end", 60, 500.0, 11)])) == {
        "threads end <= middle + 2"}
    assert failed(report(samples=[ProcSample("start", 0, 500.0, 8)])) == {"process sampled"}
    assert failed(report(end=EndState(0.01, None, 0.0, 0.0, 0.0, 10.0, 200, 16))) == {"KV blocks in use at end == 0"}
    assert failed(report(end=EndState(0.0, 2, 0.0, 0.0, 0.0, 10.0, 200, 16))) == {"KV blocks in use at end == 0"}
    assert failed(report(end=EndState(0.0, None, 1.0, 0.0, 0.0, 10.0, 200, 16))) == {"KV blocks in use at end == 0"}
    assert failed(report(end=EndState(0.0, None, 0.0, 0.0, 0.0, 0.1, 503, 16))) == {"admission slots free at end"}
    assert failed(report(server_exit_code=-9)) == {"server exits 0 on SIGTERM"}
    assert failed(report(served=0)) == {"requests served"}


def test_report_json_and_table() -> None:
    r = report(buckets=[Bucket(0.0, 30.0, 3, 90, 3.0, 520.0, 8)])
    d = json.loads(json.dumps(r.to_json()))
    assert d["passed"] is True and d["buckets"][0]["tok_per_s"] == 3.0 and d["samples"][1]["label"] == "middle"
    text = format_report(r)
    assert "soak: PASSED" in text and "RSS end <= middle + 10%" in text and "0-30" in text


def test_stop_cut_problem() -> None:
    assert stop_cut_problem(" Paris", [" Paris", "."], "stop", ".") is None
    assert "past the stop" in stop_cut_problem(" Paris", [" Paris", ".", "\n\n"], "stop", ".")
    assert "past the stop" in stop_cut_problem(" 5", [" 5", ".", "<|im_end|>"], "stop", ".")
    assert stop_cut_problem(" Paris.\n\nTh", [" Paris", ".", "\n\n", "The"], "stop", "e") is None
    assert "past the stop" in stop_cut_problem(" Paris.\n\nTh", [" Paris", ".", "\n\n", "The", " United"], "stop", "e")
    assert "do not reach" in stop_cut_problem(" Paris.", [" Paris"], "stop", ".")
    assert stop_cut_problem("a, b.", ["a", " ,", " b", " ."], "length", None) is None  # spaces cleaned up
    assert "do not spell" in stop_cut_problem("ab", ["a", "c"], "length", None)
    assert stop_cut_problem("x", ["\ufffd"], "length", None) is None  # part of a character: not judged
    assert stop_cut_problem("Hi", ["Hi", "<|im_end|>"], "stop", None) is None  # EOS: no stop string


def test_a_stop_string_cuts_the_tokens_of_a_multi_token_step(tiny_chat_model: Path) -> None:
    """Regression (found by the soak): ISD commits several tokens per step; a stop string completed
    by one of them used to leave the later ones in usage and logprobs."""
    from transformers import AutoTokenizer

    from idlm.server.generation import visible_text
    from idlm.text import IncrementalDetokenizer, StopStrings

    tok = AutoTokenizer.from_pretrained(str(tiny_chat_model))
    ids = tok(" Paris.\n\nThe United States", add_special_tokens=False)["input_ids"]
    upto = next(k for k in range(1, len(ids) + 1) if "e" in tok.decode(ids[:k]))
    stopper = StopStrings(["e"])
    text, keep = visible_text(IncrementalDetokenizer(tok), stopper, ids, False)
    assert (text, keep, stopper.matched) == (" Paris.\n\nTh", upto, "e") and keep < len(ids)
    text, keep = visible_text(IncrementalDetokenizer(tok), StopStrings([]), ids, True)
    assert (text, keep) == (" Paris.\n\nThe United States", len(ids))
    detok, stopper = IncrementalDetokenizer(tok), StopStrings(["zz"])
    pieces = [visible_text(detok, stopper, ids[i:i + 3], i + 3 >= len(ids)) for i in range(0, len(ids), 3)]
    assert "".join(t for t, _ in pieces) == " Paris.\n\nThe United States" and sum(k for _, k in pieces) == len(ids)


def test_cli_refuses_more_choices_than_the_queue_takes() -> None:
    with pytest.raises(SystemExit):
        soak.config_from_args(soak.build_parser().parse_args(["--clients", "8", "--max-queue", "4"]))
    cfg = soak.config_from_args(soak.build_parser().parse_args(["--minutes", "0.5", "--serve-args", "--tree 1"]))
    assert cfg.duration_s == 30 and cfg.serve_args == ("--tree", "1") and cfg.max_model_len == 1024


def check_real_run(r: SoakReport, seconds: float) -> None:
    assert r.passed, format_report(r)
    assert [s.label for s in r.samples] == ["start", "middle", "end"]
    assert r.load_s >= seconds and r.served > 0 and r.completion_tokens > 0
    assert r.buckets and sum(b.requests for b in r.buckets) > 0 and all(b.rss_mb for b in r.buckets)
    assert set(r.scenarios) == set(soak.SCENARIOS)  # the warm-up runs every one
    assert r.status_counts.get("400", 0) == r.expected_errors >= 1  # the over-limit prompt
    assert r.end.kv_cache_usage_perc == 0 and r.end.running == 0 and r.end.capacity_probe == 200
    assert r.server_exit_code == 0


@pytest.mark.slow  # ~35 s; `make soak` is the real run
def test_soak_20_s_on_a_real_server(tiny_chat_model: Path, tmp_path: Path) -> None:
    cfg = SoakConfig(minutes=20 / 60, clients=3, bucket_s=10, model=str(tiny_chat_model), threads=1,
                     serve_args=("--dtype", "fp32"), server_log=str(tmp_path / "serve.log"), verbose=False)
    r = soak.run_soak(cfg)
    check_real_run(r, 20)
    assert r.max_model_len == 1024


@pytest.mark.slow
def test_soak_20_s_on_the_default_model(tmp_path: Path) -> None:
    r = soak.run_soak(SoakConfig(minutes=20 / 60, clients=2, bucket_s=10, max_model_len=512, verbose=False,
                                 server_log=str(tmp_path / "serve.log")))
    check_real_run(r, 20)
    assert r.model == "idlm-smollm2-135m-instruct" and r.max_model_len == 512
