"""Introspective acceptance rate (IAR, spec §6.1): does the model agree with what it generated?

1. **Generate by the model's own parallel decoding.** Each forward takes the committed text's
   uncommitted tail as clean rows and ``B`` MASK rows after it (B = the trained block size): the last
   clean row (the anchor) gives the next token, MASK row j the token j + 1 after it, and all B + 1
   tokens are committed — no verification (the draft-only ablation of spec §3.12, in I-DLM's
   anchor + MASK layout). The MASK rows attend the way the model was trained: causally among
   themselves (I-DLM) or to every MASK of the window (``bidirectional-block``, the SDAR-style
   baseline). ``block = 0`` is plain AR decoding. With ``steps > 1`` a block is instead filled by
   SDAR-style low-confidence denoising, a few tokens per forward, most confident first, each
   committed token written into its slot before the next forward: then, under bidirectional-block
   attention, a token can be conditioned on tokens to its right, which the causal re-scoring cannot
   see. That order dependence is what the paper's IAR gap measures; with ``steps = 1`` the MASK
   inputs carry no content, so bidirectional attention among them adds compute but no information.
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


def window_mask(n_clean: int, n_mask: int, attention: str = "causal") -> torch.Tensor:
    """(T, T) bool over one window [clean rows | MASK rows]: clean rows causal; MASK rows see every
    clean row and, among MASKs, the earlier ones (causal) or all of them (bidirectional-block)."""
    t = n_clean + n_mask
    m = torch.ones(t, t, dtype=torch.bool).tril()
    if attention == "bidirectional-block":
        m[n_clean:, n_clean:] = True
    elif attention != "causal":
        raise ValueError(f"unknown attention {attention!r}")
    return m


@torch.no_grad()
def parallel_decode(model: Decoder, prompt: list[int], block: int, max_new_tokens: int,
                    attention: str = "causal", eos: tuple[int, ...] = (), temperature: float = 0.0,
                    generator: torch.Generator | None = None, steps: int = 1) -> Sequence:
    """Generate blocks of ``block + 1`` tokens without verification; records q(x) and the position
    in its block (0 = the anchor's token) of every token.

    ``steps = 1``: one forward per block commits the anchor token and all ``block`` drafts.
    ``steps = s > 1``: SDAR-style low-confidence denoising: each forward commits the most confident
    of the block's still-unknown tokens (ceil(left / steps left) of them), writes each committed
    token into its input slot (gate off, like a clean token), and runs again. Under
    ``bidirectional-block`` attention a token committed late is then conditioned on block tokens to
    its right; under causal attention only on those to its left."""
    if not prompt:
        raise ValueError("empty prompt")
    if not 1 <= steps <= block + 1:
        raise ValueError(f"steps must be in 1..{block + 1}, got {steps}")
    mask_id = model.cfg.mask_token_id
    dev = model.embed.weight.device
    cache = model.new_cache(1, len(prompt) + max_new_tokens + 2 * block + 8)
    if len(prompt) > 1:
        model.hidden(torch.tensor(prompt[:-1], device=dev), torch.arange(len(prompt) - 1, device=dev), cache)
    seq = Sequence(list(prompt))
    pending = [prompt[-1]]  # committed tokens whose K/V are not in the cache yet
    start = len(prompt) - 1  # position of pending[0]
    while len(seq.tokens) < max_new_tokens:
        c = len(pending)
        wmask = window_mask(c, block, attention)
        pos = torch.arange(start, start + c + block, device=dev)
        target: list[int | None] = [None] * (block + 1)  # x[S..S+block]; x[S+i] is read from row c-1+i
        q: list[float] = [0.0] * (block + 1)
        for step in range(steps):
            slots = [t if t is not None else mask_id for t in target[:block]]  # input at positions S..S+block-1
            ids = torch.tensor(pending + slots, device=dev)
            gate = torch.tensor([0.0] * c + [float(t is None) for t in target[:block]], device=dev)
            h = model.hidden(ids, pos, cache, gate=gate, window_mask=wmask)
            # only committed text keeps K/V; the pending rows are sent again while the block is open
            cache.crop(start + c if step == steps - 1 else start)
            logits = model.logits(h[0, c - 1:])  # anchor row, then the block rows
            probs = torch.softmax(logits, -1)
            if temperature > 0:
                picks = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
            else:
                picks = logits.argmax(-1)
            conf = probs.gather(1, picks[:, None])[:, 0]
            unknown = [i for i, t in enumerate(target) if t is None]
            k = -(-len(unknown) // (steps - step))
            for i in sorted(unknown, key=lambda i: -float(conf[i]))[:k]:
                target[i], q[i] = int(picks[i]), float(conf[i])
        new = []
        for j, t in enumerate(target):
            if len(seq.tokens) >= max_new_tokens:
                break
            seq.tokens.append(t)
            seq.q.append(q[j])
            seq.position.append(j)
            new.append(t)
            if t in eos:
                return seq
        start += c
        pending = new
    return seq


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
        s = parallel_decode(model, ids, block, max_new_tokens, attention, eos, temperature, gen, steps)
        seqs.append(rescore(model, s))
    return IARResult(block, attention, seqs, steps)
