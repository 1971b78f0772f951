"""Prompt sets: built-in verification prompts, GSM8K questions, user prompt files, chat formatting."""

from __future__ import annotations

import json
from pathlib import Path

# Built-in prompts for `idlm verify`: a spread of math, code, explanation and writing requests.
BUILTIN_PROMPTS = [
    "What is the capital of France? Answer in one sentence, then give two facts about it.",
    "Write a Python function that checks whether a string is a palindrome, with a short docstring.",
    "Explain why the sky is blue to a ten-year-old.",
    "Tom has 12 marbles. He gives 3 to Anna and buys twice as many as he has left. How many marbles does he have now?",
    "List five tips for writing clear emails.",
    "Translate 'Good morning, how are you today?' into French and Spanish.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the water cycle in four steps.",
    "Write a haiku about autumn leaves.",
    "A train travels 60 km per hour for 2.5 hours. How far does it go? Show your reasoning.",
    "Give a recipe for a simple tomato pasta.",
    "What are the main causes of inflation?",
    "Write a SQL query that returns the ten most recent orders from a table named orders.",
    "Describe the rules of tic-tac-toe.",
    "Why do we have seasons on Earth?",
    "Write a short story opening about a lighthouse keeper.",
]

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def gsm8k_path(split: str = "test") -> Path:
    """../shared/data/gsm8k/<split>.jsonl next to the repository checkout."""
    for base in (SHARED_DATA, Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"):
        p = base / "gsm8k" / f"{split}.jsonl"
        if p.exists():
            return p
    raise FileNotFoundError(f"GSM8K {split} split not found (looked for ../shared/data/gsm8k/{split}.jsonl)")


def gsm8k_questions(k: int, split: str = "test") -> list[str]:
    out = []
    with open(gsm8k_path(split)) as f:
        for line in f:
            out.append(json.loads(line)["question"])
            if len(out) >= k:
                break
    return out


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (plain text), or JSONL with a "prompt" or "question" field."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            obj = json.loads(line)
            out.append(obj.get("prompt") or obj.get("question") or "")
        else:
            out.append(line)
    return [p for p in out if p]


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """Token ids for a prompt; with ``chat`` the model's chat template wraps it as one user turn."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(text, add_special_tokens=False)
