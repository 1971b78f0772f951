"""A draft vocabulary: the tokens MASK rows may propose, the K most frequent in the drafter's training data.

A MASK row only proposes drafts; the clean rows verify them against the whole vocabulary. Scoring a MASK row
over K frequent tokens instead of all of them (frequency-ranked drafting, as in FR-Spec) cuts the head, the
widest matmul, for most of a window's rows, and only costs the drafts whose right token is rare: those are
rejected and corrected like any wrong draft, so the output does not change (greedy: bit for bit; sampling: q
is the distribution the draft was drawn from, zero outside the K tokens, and the p/q test stays exact).

The ranking lives next to a converted model or adapter as ``draft_vocab.json``
(``{"ranking": [ids, most frequent first], "default_k": K, ...}``), written by ``idlm data vocab``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

FILE = "draft_vocab.json"


def count_tokens(responses: Iterable[Iterable[int]]) -> Counter:
    counts: Counter = Counter()
    for ids in responses:
        counts.update(ids)
    return counts


def write_ranking(path: Path, counts: Counter, default_k: int, source: list[str], vocab_size: int = 0) -> dict:
    """Token ids by count (ties: lower id first), then, up to ``vocab_size``, the ids never seen in increasing
    order (a BPE vocabulary's lower ids are its earlier, more frequent merges), with the default K and what was
    counted."""
    ranking = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    ranking += [t for t in range(vocab_size) if t not in counts]
    total = sum(counts.values())
    top = sum(counts[t] for t in ranking[:default_k])
    meta = {"ranking": ranking, "default_k": min(default_k, len(ranking)), "tokens_counted": total,
            "distinct": len(counts), "coverage_at_default_k": round(top / total, 4) if total else 0.0,
            "source": source}
    path.write_text(json.dumps(meta))
    return meta


def read_ranking(folder: Path) -> dict | None:
    """The ranking file of a model folder, or None."""
    f = Path(folder) / FILE
    if not f.is_file():
        return None
    meta = json.loads(f.read_text())
    if not isinstance(meta.get("ranking"), list) or not isinstance(meta.get("default_k"), int):
        raise ValueError(f"{f}: not a draft vocabulary file (needs 'ranking' and 'default_k')")  # noqa: TRY004
    return meta


def choose(meta: dict | None, setting: str | int, folder: Path) -> list[int] | None:
    """The draft vocabulary for ``--draft-vocab`` ``setting``: "auto" (the file's default K, or the whole
    vocabulary without a file), "full" / 0 (the whole vocabulary) or K (the file's K most frequent)."""
    if setting in ("full", 0, "0"):
        return None
    if setting == "auto":
        return None if meta is None else meta["ranking"][: meta["default_k"]]
    k = int(setting)
    if meta is None:
        raise ValueError(f"--draft-vocab {k}: {folder} has no {FILE} (make one with `idlm data vocab`)")
    return meta["ranking"][:k]
