"""The stop rule (spec §3.6 Stop/EOS): which emitted tokens a request keeps and why it ends.

Stateless: the tokens it extends belong to the caller (the batch-1 decoders' local list, or the
engine's per-request ``Stopper`` in ``idlm/engine/request.py``), so both apply one definition."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SamplingParams


@dataclass(frozen=True)
class StopRule:
    """When one request's generation ends."""

    stop_ids: frozenset[int]  # the request's stop token ids, plus the model's EOS ids unless ignore_eos
    max_new_tokens: int  # output budget

    @classmethod
    def of(cls, params: SamplingParams, eos_ids: tuple[int, ...]) -> StopRule:
        eos = frozenset() if params.ignore_eos else frozenset(eos_ids)
        return cls(frozenset(params.stop_token_ids) | eos, params.max_new_tokens)

    def extend(self, tokens: list[int], emitted: list[int]) -> str | None:
        """Append ``emitted`` to ``tokens`` one at a time; at a stop id ("stop") or the budget
        ("length") return the finish reason and drop the tokens after it; None while going on."""
        for t in emitted:
            tokens.append(t)
            if t in self.stop_ids:
                return "stop"
            if len(tokens) >= self.max_new_tokens:
                return "length"
        return None
