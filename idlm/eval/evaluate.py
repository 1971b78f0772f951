"""One evaluation run: generate (runner.py), score (tasks.py), write per-example records, summarise.

``evaluate`` returns an ``EvalResult`` whose ``summary()`` is the final JSON line of ``idlm eval``;
``records`` are the per-example rows written to JSONL. ``compare`` checks the engine's contract
that greedy ISD and AR give the same per-example outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .runner import GenerationRun
from .tasks import Example, Score


@dataclass
class EvalResult:
    task: str
    mode: str
    stride: int | str
    examples: list[Example]
    run: GenerationRun
    scores: list[Score]
    concurrency: int
    where: str  # "engine" or the server URL

    @property
    def main(self) -> str:
        return self.scores[0].main if self.scores else "score"

    def mean(self, metric: str) -> float:
        return sum(s.values[metric] for s in self.scores) / len(self.scores) if self.scores else 0.0

    def records(self) -> list[dict]:
        out = []
        for ex, g, s in zip(self.examples, self.run.generations, self.scores):
            out.append({"task": self.task, "id": ex.id, "mode": self.mode, "stride": self.stride,
                        "prompt": ex.prompt, "output": g.text, "score": s.values, "detail": s.detail,
                        "tokens": g.tokens, "forwards": g.forwards,
                        "tpf": round(g.tokens / g.forwards, 4) if g.forwards else None,
                        "finish_reason": g.finish_reason, "seconds": round(g.seconds, 4), "error": g.error})
        return out

    def write(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records())
        tmp.replace(p)
        return p

    def summary(self) -> dict:
        run = self.run
        metrics = list(self.scores[0].values) if self.scores else []
        return {"task": self.task, "mode": self.mode, "stride": self.stride if self.mode == "isd" else 1,
                "score": round(self.mean(self.main), 4), "metric": self.main,
                "scores": {m: round(self.mean(m), 4) for m in metrics}, "n": len(self.scores),
                "errors": sum(g.error is not None for g in run.generations),
                "tpf": None if run.tpf is None else round(run.tpf, 4),
                "tokens_per_s": round(run.tokens_per_s, 3), "tokens": run.tokens, "forwards": run.forwards,
                "seconds": round(run.seconds, 3), "concurrency": self.concurrency, "where": self.where}


def compare(a: EvalResult, b: EvalResult) -> dict:
    """Per-example agreement of two runs over the same examples (outputs and scores)."""
    same = [x.text == y.text for x, y in zip(a.run.generations, b.run.generations)]
    differ = [g.id for g, s in zip(a.run.generations, same) if not s]
    return {"identical": round(sum(same) / len(same), 4) if same else 1.0, "differing_ids": differ[:20],
            "same_score": a.mean(a.main) == b.mean(b.main),
            "speed_ratio": round(a.run.tokens_per_s / b.run.tokens_per_s, 4) if b.run.tokens_per_s else None}


def score_all(task, examples: list[Example], run: GenerationRun) -> list[Score]:
    pairs = list(zip(examples, (g.text for g in run.generations)))
    if hasattr(task, "score_many"):
        return task.score_many(pairs)
    return [task.score(ex, text) for ex, text in pairs]
