"""Training and evaluation records: ``Sample`` (prompt and response token ids) and reading them from JSONL,
as ``idlm data generate`` writes it or as text records tokenized on the way in."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GSM8K_TRAIN_ENV = "IDLM_GSM8K_TRAIN"  # override of the GSM8K train-split path


@dataclass(frozen=True)
class Sample:
    """One training example: token ids of the chat prompt and of the (self-generated) response."""

    prompt_ids: tuple[int, ...]  # chat-templated prompt, ends with the assistant header
    response_ids: tuple[int, ...]  # the assistant turn, including its end-of-turn token

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def gsm8k_train_path() -> Path:
    env = os.environ.get(GSM8K_TRAIN_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared/data/gsm8k/train.jsonl"


def check_not_test(path: Path) -> None:
    if "test" in path.stem.lower() and any("gsm8k" in p.lower() for p in path.parts):
        raise ValueError(f"{path} is an evaluation split; never train on it (use gsm8k = the train split)")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    out = []
    for i, line in enumerate(lines):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # a torn last line of an interrupted append: ignore it
                    break
                raise ValueError(f"{path}:{i + 1}: invalid JSON") from None
    return out


class LazyTokenizer:
    """A loaded model's tokenizer, loaded only if a data file holds text records (token-id records
    need none, and test models saved without a tokenizer have none)."""

    def __init__(self, lm):
        self.lm, self._tok = lm, None

    def __getattr__(self, name: str):
        if self._tok is None:
            self._tok = self.lm.tokenizer()
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self.__getattr__("__call__")(*args, **kwargs)


def load_samples(paths: list[str] | tuple[str, ...], tokenizer: Any = None, evaluation: bool = False) -> list[Sample]:
    """Training samples from JSONL records with ``prompt_ids``/``response_ids`` (as written by
    ``generate_data``) or, given a tokenizer, {"prompt", "response"} / {"messages"} / GSM8K's
    {"question", "answer"} text records. ``evaluation``: scoring only (``idlm eval --task nll``), so an
    evaluation split such as GSM8K test is allowed; training loads refuse it."""
    out: list[Sample] = []
    for p in paths:
        if not evaluation:
            check_not_test(Path(p))
        for rec in read_jsonl(Path(p)):
            s = _sample_from_record(rec, tokenizer, p)
            if s is not None and s.response_ids:
                out.append(s)
    if not out:
        raise ValueError(f"no training samples in {', '.join(map(str, paths))}")
    return out


def _sample_from_record(rec: dict[str, Any], tok: Any, path: str) -> Sample | None:
    if "prompt_ids" in rec and "response_ids" in rec:
        return Sample(tuple(rec["prompt_ids"]), tuple(rec["response_ids"]))
    if tok is None:
        raise ValueError(f"{path}: text records need a tokenizer (or prompt_ids/response_ids)")
    if "messages" in rec:
        msgs = rec["messages"]
        if not msgs or msgs[-1]["role"] != "assistant":
            return None
        prompt, response = msgs[:-1], msgs[-1]["content"]
    elif "question" in rec and "answer" in rec:  # GSM8K: the reference solution as the response
        prompt, response = [{"role": "user", "content": rec["question"]}], rec["answer"]
    else:
        prompt, response = [{"role": "user", "content": rec["prompt"]}], rec["response"]
    ptext = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    pids = tok(ptext, add_special_tokens=False).input_ids
    rids = tok(response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return Sample(tuple(pids), tuple(rids))
