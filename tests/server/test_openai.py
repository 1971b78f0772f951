"""The official `openai` client against `idlm serve` (tiny model, fp32, real HTTP on loopback)."""

from __future__ import annotations

import openai
import pytest
import torch

from .conftest import Served


@pytest.fixture(scope="module")
def client(server: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client: openai.OpenAI) -> str:
    models = client.models.list().data
    assert len(models) == 1 and models[0].max_model_len == 1024
    return models[0].id


PROMPT = "The quick brown fox"


def stream_text(stream, index: int = 0) -> tuple[str, list]:
    text, chunks = "", []
    for ch in stream:
        chunks.append(ch)
        for c in ch.choices:
            if c.index == index:
                text += (c.text if hasattr(c, "text") else (c.delta.content or ""))
    return text, chunks


def test_completion_stream_equals_non_stream_and_usage(client: openai.OpenAI, model_id: str) -> None:
    full = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24, temperature=0)
    c = full.choices[0]
    assert c.finish_reason == "length" and full.usage.completion_tokens == 24
    assert full.usage.total_tokens == full.usage.prompt_tokens + 24
    assert c.model_extra["idlm"]["forwards"] >= 1 and c.model_extra["idlm"]["tokens"] == 24
    text, chunks = stream_text(client.completions.create(model=model_id, prompt=PROMPT, max_tokens=24,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True}))
    assert text == c.text
    finals = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason is not None]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24  # include_usage: last, alone
    assert all(ch.usage is None for ch in chunks[:-1])


def test_default_max_tokens_is_16(client: openai.OpenAI, model_id: str) -> None:
    out = client.completions.create(model=model_id, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 16


def test_chat_stream_equals_non_stream(client: openai.OpenAI, model_id: str) -> None:
    msgs = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=20, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=20, temperature=0, stream=True)
    text, chunks = stream_text(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == full.choices[0].message.content
    assert sum(ch.choices[0].finish_reason is not None for ch in chunks if ch.choices) == 1


def test_ar_and_isd_give_the_same_greedy_text(client: openai.OpenAI, model_id: str) -> None:
    texts = {client.completions.create(model=model_id, prompt=PROMPT, max_tokens=30, temperature=0,
                                       extra_body=extra).choices[0].text
             for extra in ({"mode": "ar"}, {"stride": 2}, {"stride": 4}, {"stride": "auto"})}
    assert len(texts) == 1


def test_stop_string_spanning_chunks_is_cut_exactly(client: openai.OpenAI, model_id: str) -> None:
    ar = {"mode": "ar"}  # one token per chunk, so a stop string across two tokens spans two chunks
    full = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                     extra_body=ar)
    pieces = [ch.choices[0].text for ch in full if ch.choices and ch.choices[0].text]
    text = "".join(pieces)
    k = next(i for i in range(3, len(pieces)) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    want = text[: text.find(stop)]
    for stream in (False, True):
        out = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=40, temperature=0, stop=[stop],
                                        stream=stream, extra_body=ar)
        got, chunks = stream_text(out) if stream else (out.choices[0].text, [out])
        last = [c for ch in chunks for c in ch.choices if c.finish_reason is not None][-1]
        assert got == want and last.finish_reason == "stop" and stop not in got


def test_n_and_seed(client: openai.OpenAI, model_id: str) -> None:
    kw = {"model": model_id, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 7}
    a = client.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].text != a.choices[1].text  # different seeds per choice
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    c = client.completions.create(**kw, extra_body={"mode": "ar"})  # coupled sampling: same tokens with AR
    assert c.choices[0].text == a.choices[0].text
    streamed = client.completions.create(n=2, stream=True, **kw)
    texts = {0: "", 1: ""}
    for ch in streamed:
        for choice in ch.choices:
            texts[choice.index] += choice.text
    assert [texts[0], texts[1]] == [x.text for x in a.choices]


def _reference_logprobs(model_folder, ids: list[int]) -> torch.Tensor:
    from idlm.model import load_model

    lm = load_model(str(model_folder), dtype=torch.float32)
    with torch.inference_mode():
        return torch.log_softmax(lm.model.forward(torch.tensor([ids]), torch.arange(len(ids))[None])[0], -1)


def test_logprobs_are_the_anchor_log_softmax(client: openai.OpenAI, model_id: str, server: Served,
                                              tiny_chat_model) -> None:
    out = client.completions.create(model=model_id, prompt=[5, 17, 300, 42], max_tokens=8, temperature=0,
                                    logprobs=3, extra_body={"return_token_ids": True})
    lp = out.choices[0].logprobs
    tok_ids = [5, 17, 300, 42]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_chat_model))
    gen = tok(out.choices[0].text, add_special_tokens=False)["input_ids"]
    ref = _reference_logprobs(tiny_chat_model, tok_ids + gen)
    assert len(lp.token_logprobs) == 8
    for i, (t, v) in enumerate(zip(gen, lp.token_logprobs)):
        assert v == pytest.approx(float(ref[len(tok_ids) - 1 + i, t]), abs=2e-4)
        assert len(lp.top_logprobs[i]) >= 3 and max(lp.top_logprobs[i].values()) == pytest.approx(v, abs=1e-6)


def test_echo_with_max_tokens_0_scores_the_prompt(client: openai.OpenAI, model_id: str, tiny_chat_model) -> None:
    ids = [5, 17, 300, 42, 7, 99]
    out = client.completions.create(model=model_id, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0)
    c = out.choices[0]
    ref = _reference_logprobs(tiny_chat_model, ids)
    assert c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None
    assert c.logprobs.token_logprobs[1:] == pytest.approx([float(ref[i - 1, t]) for i, t in enumerate(ids) if i],
                                                          abs=2e-4)
    assert len(c.logprobs.tokens) == len(ids) and out.usage.completion_tokens == 0
    assert c.text == "".join(c.logprobs.tokens)
    # lm-eval's loglikelihood request: echo, max_tokens 1, logprobs 1 -> prompt logprobs, then one token
    one = client.completions.create(model=model_id, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    assert one.choices[0].logprobs.token_logprobs[:len(ids)] == c.logprobs.token_logprobs
    assert len(one.choices[0].logprobs.token_logprobs) == len(ids) + 1


def test_chat_logprobs(client: openai.OpenAI, model_id: str) -> None:
    out = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert all(len(x.top_logprobs) == 2 and x.top_logprobs[0].logprob >= x.logprob - 1e-6 for x in content)
