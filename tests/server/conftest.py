"""`idlm serve` as a real subprocess on a free loopback port, over a tiny random model that carries
the default model's tokenizer (49,152 tokens, chat template), so HTTP tests run in seconds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ..conftest import write_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from idlm.model.loading import resolve_folder

    base = resolve_folder("smollm2-135m-instruct")
    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chat"), "llama", seed=5, vocab_size=49152,
                                   max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / f).exists():
            shutil.copy(base / f, folder / f)
    return folder


class Served:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def start_server(model: str | Path | None, tmp: Path, *extra: str, timeout: float = 180.0,
                 env: dict | None = None) -> Served:
    port = free_port()
    args = [sys.executable, "-m", "idlm.cli", "serve", "--port", str(port), "--threads", "1", *extra]
    if model is not None:
        args += ["--model", str(model)]
    log = tmp / f"serve-{port}.log"
    proc = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"idlm serve exited early:\n{log.read_text()}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return Served(proc, url, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"idlm serve not healthy after {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    s = start_server(tiny_chat_model, tmp_path_factory.mktemp("srv"), "--dtype", "fp32", "--max-running", "8",
                     "--stride", "3")
    yield s
    s.stop()
