"""Clean-path quality: negative log-likelihood of held-out responses under plain causal decoding.

A converted model must still be a good causal LM (its clean path is the verifier, spec §1): this scores
``{"prompt_ids", "response_ids"}`` records (e.g. base-model generations that training never saw) with
the gates off, i.e. exactly the network that greedy decoding and ISD's verification run. Reported per
response token: mean NLL and top-1 agreement with the recorded token (for greedy base generations, the
agreement with the base model's own choices).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.records import Sample
from ..model.decoder import Decoder


@dataclass(frozen=True)
class NllResult:
    nll: float  # mean negative log-likelihood per response token (nats)
    top1: float  # fraction of response tokens that are the model's argmax
    tokens: int  # response tokens scored
    samples: int

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll).exp())

    def to_json(self) -> dict:
        return {"nll": round(self.nll, 5), "ppl": round(self.perplexity, 4), "top1": round(self.top1, 4),
                "tokens": self.tokens, "samples": self.samples}


@torch.inference_mode()
def response_nll(model: Decoder, samples: list[Sample], max_len: int = 1024, progress: bool = False) -> NllResult:
    """Score each sample's response given its prompt with causal attention, one sample at a time.
    Samples are truncated to ``max_len`` tokens; a sample with no response token left is skipped."""
    total, agree, count, used = 0.0, 0, 0, 0
    for s in tqdm(samples, desc="nll", disable=not progress, leave=False):
        ids = list(s.prompt_ids + s.response_ids)[:max_len]
        p = len(s.prompt_ids)
        if len(ids) <= p or p < 1:
            continue
        x = torch.tensor(ids, device=model.embed.weight.device)
        h = model.hidden(x, torch.arange(len(ids), device=x.device))  # (1, L, hidden), causal
        logits = model.logits(h[0, p - 1: len(ids) - 1])  # predictions of the response tokens
        target = x[p:]
        total += F.cross_entropy(logits, target, reduction="sum").item()
        agree += int((logits.argmax(-1) == target).sum())
        count += len(target)
        used += 1
    if not count:
        raise ValueError("no response tokens to score")
    return NllResult(total / count, agree / count, count, used)
