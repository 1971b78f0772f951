"""End to end on the default model (SmolLM2-135M-Instruct + the shipped R-ISD drafter): the served
greedy text is `idlm generate`'s text for the same prompt and settings."""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest

from .conftest import start_server

PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many in May. How many in all?"


@pytest.mark.slow  # ~140 s on the 2-core CI machine; test_eval_server checks server == in-process by default
def test_served_greedy_text_equals_idlm_generate(tmp_path) -> None:
    cli = subprocess.run([sys.executable, "-m", "idlm.cli", "generate", "--prompt", PROMPT, "--chat", "--json",
                          "--max-new-tokens", "48", "--threads", "1"], capture_output=True, text=True, timeout=300, check=False)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout.strip().splitlines()[-1])["text"]
    s = start_server(None, tmp_path)
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=120)
        for extra in ({}, {"mode": "ar"}):
            out = client.chat.completions.create(model="idlm-smollm2-135m-instruct", temperature=0, max_tokens=48,
                                                 messages=[{"role": "user", "content": PROMPT}], extra_body=extra)
            assert out.choices[0].message.content == want
        assert out.choices[0].model_extra["idlm"]["mode"] == "ar"
    finally:
        assert s.stop() == 0
