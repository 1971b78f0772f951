"""Introspective acceptance rate (IAR, spec §6.1): does the model agree with what it generated?

1. **Generate by the model's own parallel decoding** (``idlm.decode.draft_only.parallel_decode``):
   blocks of ``B`` + 1 tokens from an anchor row and ``B`` MASK rows (B = the trained block size),
   committed without verification (the draft-only ablation of spec §3.12), the MASK rows attending
   causally (I-DLM) or bidirectionally (``bidirectional-block``, the SDAR-style baseline); ``block
   = 0`` is plain AR decoding. With ``steps > 1`` a block is filled by SDAR-style low-confidence
   denoising, so under bidirectional-block attention a token can be conditioned on tokens to its
   right, which the causal re-scoring cannot see: that order dependence is what the paper's IAR gap
   measures.
2. **Re-score with the causal anchor pass.** One clean causal forward over prompt + output (gates
   off: the base model under R-ISD) gives p_k, the distribution of token k given the committed
   text x_<k.
3. ``IAR = mean_k min(1, p_k(x_k) / q_k(x_k))``.

**Which q.** q_k is the softmax, at temperature 1, of the logits of the row that produced x_k: the
anchor row for the first token of each step (then q_k = p_k exactly, since it is the same causal
pass over the same text, and its ratio is 1), MASK row j for the j-th draft. p_k is the softmax at
temperature 1 of the causal logits. With ``--temperature 1`` (sampling) x_k is drawn from q_k, so
this is literally the definition; with greedy decoding (the default, reproducible) x_k = argmax q_k
and min(1, p/q) is the probability that ISD's p/q acceptance test at T = 1 would accept that draft.
Both are reported per draft position (0 = anchor, 1..B = drafts); ``greedy_agreement`` is the
fraction with x_k = argmax p_k, i.e. what a greedy ISD verifier would accept. An AR model
re-scoring its own AR output gives exactly 1.0 (the decode's anchor rows and the re-scoring pass are
computed by the same row-stable kernels, so p = q bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decode.draft_only import parallel_decode
from ..model.decoder import Decoder


@dataclass
class Sequence:
    """One generated sequence with, per token, q(x), p(x), argmax-p agreement and the draft position."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    q: list[float] = field(default_factory=list)
    p: list[float] = field(default_factory=list)
    agree: list[bool] = field(default_factory=list)
    position: list[int] = field(default_factory=list)  # 0 = anchor token of its step, j = j-th draft


@dataclass
class IARResult:
    block: int
    attention: str
    sequences: list[Sequence]
    steps: int = 1  # forwards per block (1 = all drafts at once; > 1 = low-confidence denoising)

    def _ratios(self, pos: int | None = None) -> list[float]:
        return [min(1.0, p / q) if q > 0 else 1.0
                for s in self.sequences for p, q, j in zip(s.p, s.q, s.position) if pos is None or j == pos]

    @property
    def iar(self) -> float:
        r = self._ratios()
        return sum(r) / len(r) if r else 0.0

    def per_position(self) -> list[float | None]:
        out = []
        for j in range(self.block + 1):
            r = self._ratios(j)
            out.append(sum(r) / len(r) if r else None)
        return out

    @property
    def draft_iar(self) -> float | None:
        r = [x for j in range(1, self.block + 1) for x in self._ratios(j)]
        return sum(r) / len(r) if r else None

    def agreement(self, pos: int | None = None) -> float | None:
        a = [g for s in self.sequences for g, j in zip(s.agree, s.position) if pos is None or j == pos]
        return sum(a) / len(a) if a else None

    def to_json(self) -> dict:
        def r(v):
            return None if v is None else round(v, 4)

        n = sum(len(s.tokens) for s in self.sequences)
        return {"iar": r(self.iar), "draft_iar": r(self.draft_iar),
                "iar_per_position": [r(v) for v in self.per_position()],
                "greedy_agreement": r(self.agreement()),
                "greedy_agreement_per_position": [r(self.agreement(j)) for j in range(self.block + 1)],
                "tokens": n, "sequences": len(self.sequences), "block": self.block, "attention": self.attention,
                "steps": self.steps}


def iar_of(p: torch.Tensor, q: torch.Tensor) -> float:
    """mean min(1, p/q) over paired probabilities (the hand-checkable core of the metric)."""
    return float(torch.clamp(p / q, max=1.0).mean())


@torch.no_grad()
def rescore(model: Decoder, seq: Sequence) -> Sequence:
    """Fill in p(x) and argmax agreement with one causal clean pass (gates off) over prompt + output."""
    if not seq.tokens:
        return seq
    dev = model.embed.weight.device
    full = seq.prompt + seq.tokens
    cache = model.new_cache(1, len(full) + 8)
    h = model.hidden(torch.tensor(full[:-1], device=dev), torch.arange(len(full) - 1, device=dev), cache)
    logits = model.logits(h[0, len(seq.prompt) - 1:])  # row i predicts output token i
    probs = torch.softmax(logits, -1)
    idx = torch.tensor(seq.tokens, device=dev)
    seq.p = probs.gather(1, idx[:, None])[:, 0].tolist()
    seq.agree = (logits.argmax(-1) == idx).tolist()
    return seq


def measure_iar(model: Decoder, prompts: list[list[int]], block: int, max_new_tokens: int,
                attention: str = "causal", eos: tuple[int, ...] = (), temperature: float = 0.0,
                seed: int = 0, progress: bool = False, steps: int = 1) -> IARResult:
    from tqdm import tqdm

    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    seqs = []
    for ids in tqdm(prompts, desc=f"iar B={block} {attention}", disable=not progress, leave=False):
        d = parallel_decode(model, ids, block, max_new_tokens, attention, eos, temperature, gen, steps)
        seqs.append(rescore(model, Sequence(d.prompt, d.tokens, d.q, position=d.position)))
    return IARResult(block, attention, seqs, steps)
