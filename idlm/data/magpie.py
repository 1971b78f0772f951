"""Varied prompts for self-distillation, written by the base model itself (the Magpie recipe):
the chat template up to an open *user* turn is fed to the instruct model, which samples what a
user might ask. ``idlm data generate`` then answers them greedily like any other prompt source.

Self-distillation trains the drafter on the base model's own answers, so what matters is that the
prompts are varied and in the model's distribution, not that they are well written; GSM8K and the
built-in mix cover math and ~100 hand-written requests, and these cover the rest of what the model
gets asked. Each prompt is a pure function of (seed, index), so an interrupted run resumes exactly.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

MIN_WORDS = 4  # shorter samples are mostly fragments
MAX_CHARS = 600


@dataclass(frozen=True)
class PromptGenResult:
    out_path: Path
    written: int  # new prompts appended by this call
    total: int  # prompts in the file now
    sampled: int  # user turns sampled by this call (rejected ones included)
    exhausted: bool = False  # stopped at max_samples before reaching count


def user_prefix(tok) -> str:
    """The chat template's text up to the content of a first user turn (system prompt included
    when the template adds a default one)."""
    marker = "\x00IDLM_USER\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                   add_generation_prompt=False)
    cut = text.find(marker)
    if cut <= 0:
        raise ValueError("the model's chat template does not place a user turn's text where expected")
    return text[:cut]


def clean_prompt(text: str) -> str | None:
    """A sampled user turn -> a usable prompt, or None (too short, too long, template debris)."""
    text = text.strip()
    if "<|" in text or "|>" in text or len(text) > MAX_CHARS or len(text.split()) < MIN_WORDS:
        return None
    return text


def _existing(path: Path) -> tuple[list[str], int]:
    """(prompts already in the file, next index to sample)."""
    prompts, next_index = [], 0
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted append
            prompts.append(rec["prompt"])
            next_index = max(next_index, int(rec.get("index", -1)) + 1)
    return prompts, next_index


def synthesize_prompts(out_path: str | Path, count: int, model: str | None = None, seed: int = 0,
                       batch_size: int = 16, max_tokens: int = 96, temperature: float = 1.0, top_p: float = 0.95,
                       progress: bool = True, max_samples: int | None = None) -> PromptGenResult:
    """Append sampled user prompts to ``out_path`` (JSONL {"prompt", "index", "source": "magpie"})
    until it holds ``count`` distinct ones; duplicates (case-insensitive) and fragments are dropped.
    Gives up after ``max_samples`` samples in this call (default 20 per prompt asked for), so a model
    that never ends a user turn cannot loop forever."""
    from tqdm import tqdm

    from ..config import DecodeConfig, SamplingParams
    from .selfdistill import BaseGenerator

    out_path = Path(out_path)
    have, index = _existing(out_path)
    seen = {p.lower() for p in have}
    if len(have) >= count:
        return PromptGenResult(out_path, 0, len(have), 0)
    gen = BaseGenerator(model, "cpu", seed, batch_size)  # the bare base, as it is served, and its engine
    tok, stops, engine = gen.tok, gen.eos, gen.engine
    prefix = tok(user_prefix(tok), add_special_tokens=False).input_ids
    written = sampled = 0
    limit = max_samples if max_samples is not None else 20 * (count - len(have))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("a") as f, tqdm(total=count, initial=len(have), desc="prompts", unit="prompt",
                                       disable=not progress) as bar:
        while len(have) < count and sampled < limit:
            n = 2 * batch_size
            params = [SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                     seed=zlib.crc32(f"{seed}:{index + i}".encode()) % 2**31,
                                     stop_token_ids=tuple(sorted(stops)))
                      for i in range(n)]
            outs = engine.generate([prefix] * n, params, DecodeConfig(mode="ar"))
            for i, c in enumerate(outs):
                sampled += 1
                if c.finish_reason != "stop":  # cut off mid-sentence
                    continue
                text = clean_prompt(tok.decode([t for t in c.token_ids if t not in stops], skip_special_tokens=True))
                if text is None or text.lower() in seen or len(have) >= count:
                    continue
                seen.add(text.lower())
                have.append(text)
                f.write(json.dumps({"prompt": text, "index": index + i, "source": "magpie"}) + "\n")
                written += 1
                bar.update(1)
            index += n
            f.flush()
    return PromptGenResult(out_path, written, len(have), sampled, len(have) < count)
