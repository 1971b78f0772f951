"""Draft-only parallel decoding (spec §3.12's ablation, in I-DLM's anchor + MASK layout): blocks of
tokens committed without verification, and SDAR-style low-confidence denoising. ``eval/iar.py``
measures the introspective acceptance rate (IAR) of what this generates.

Each forward takes the committed text's uncommitted tail as clean rows and ``block`` MASK rows after
it (block = the trained block size): the last clean row (the anchor) gives the next token, MASK row
j the token j + 1 after it, and all block + 1 tokens are committed. The MASK rows attend the way the
model was trained (``window_mask``): causally among themselves (I-DLM) or to every MASK of the window
(``bidirectional-block``, the SDAR-style baseline). ``block = 0`` is plain AR decoding. With
``steps > 1`` a block is instead filled by low-confidence denoising, a few tokens per forward, most
confident first, each committed token written into its slot before the next forward: then, under
bidirectional-block attention, a token can be conditioned on tokens to its right, which a causal
re-scoring cannot see. With ``steps = 1`` the MASK inputs carry no content, so bidirectional
attention among them adds compute but no information.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.decoder import Decoder, KVCache


@dataclass
class DraftOnlyOutput:
    """One generated sequence with, per token, q(x) and its position in its block."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    q: list[float] = field(default_factory=list)  # probability of the token under the row that produced it (T = 1)
    position: list[int] = field(default_factory=list)  # 0 = anchor token of its step, j = j-th draft


@dataclass(frozen=True)
class _Block:
    """Where the open block sits and how it is filled."""

    pending: list[int]  # committed tokens whose K/V are not in the cache yet (the block's clean rows)
    start: int  # position of pending[0]
    size: int  # MASK rows after the anchor
    attention: str  # "causal" or "bidirectional-block" among the MASK rows


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
                    generator: torch.Generator | None = None, steps: int = 1) -> DraftOnlyOutput:
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
    dev = model.embed.weight.device
    cache = model.new_cache(1, len(prompt) + max_new_tokens + 2 * block + 8)
    if len(prompt) > 1:
        model.hidden(torch.tensor(prompt[:-1], device=dev), torch.arange(len(prompt) - 1, device=dev), cache)
    out = DraftOnlyOutput(list(prompt))
    blk = _Block([prompt[-1]], len(prompt) - 1, block, attention)
    while len(out.tokens) < max_new_tokens:
        target, q = _fill_block(model, cache, blk, steps, temperature, generator)
        new, stopped = _commit(out, target, q, max_new_tokens, eos)
        if stopped:
            break
        blk = _Block(new, blk.start + len(blk.pending), block, attention)
    return out


def _fill_block(model: Decoder, cache: KVCache, blk: _Block, steps: int, temperature: float,
                generator: torch.Generator | None) -> tuple[list[int], list[float]]:
    """The block's block + 1 tokens (x[S..S+block], x[S+i] read from row c-1+i) and their q, in
    ``steps`` forwards, each committing the most confident still-unknown tokens."""
    target: list[int | None] = [None] * (blk.size + 1)
    q: list[float] = [0.0] * (blk.size + 1)
    for step in range(steps):
        logits = _block_forward(model, cache, blk, target, last=step == steps - 1)
        picks, conf = _choose(logits, temperature, generator)
        unknown = [i for i, t in enumerate(target) if t is None]
        k = -(-len(unknown) // (steps - step))
        for i in sorted(unknown, key=lambda i: -float(conf[i]))[:k]:
            target[i], q[i] = int(picks[i]), float(conf[i])
    filled = [t for t in target if t is not None]
    assert len(filled) == len(target)  # the last forward commits every token still unknown
    return filled, q


def _block_forward(model: Decoder, cache: KVCache, blk: _Block, target: list[int | None], last: bool
                   ) -> torch.Tensor:
    """One forward over [pending | the block's slots]; (block + 1, V) logits: the anchor row, then the
    block rows. Only committed text keeps K/V: the pending rows are sent again while the block is open."""
    dev = model.embed.weight.device
    c = len(blk.pending)
    slots = [t if t is not None else model.cfg.mask_token_id for t in target[:blk.size]]  # positions S..S+block-1
    ids = torch.tensor(blk.pending + slots, device=dev)
    gate = torch.tensor([0.0] * c + [float(t is None) for t in target[:blk.size]], device=dev)
    pos = torch.arange(blk.start, blk.start + c + blk.size, device=dev)
    h = model.hidden(ids, pos, cache, gate=gate, window_mask=window_mask(c, blk.size, blk.attention))
    cache.crop(blk.start + c if last else blk.start)
    return model.logits(h[0, c - 1:])


def _choose(logits: torch.Tensor, temperature: float, generator: torch.Generator | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's pick (argmax, or a draw at ``temperature``) and its probability at T = 1."""
    probs = torch.softmax(logits, -1)
    if temperature > 0:
        picks = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
    else:
        picks = logits.argmax(-1)
    return picks, probs.gather(1, picks[:, None])[:, 0]


def _commit(out: DraftOnlyOutput, target: list[int], q: list[float], max_new_tokens: int,
            eos: tuple[int, ...]) -> tuple[list[int], bool]:
    """Append the block's tokens to ``out`` up to the budget or an EOS; returns the appended tokens and
    whether an EOS ended generation."""
    new: list[int] = []
    for j, t in enumerate(target):
        if len(out.tokens) >= max_new_tokens:
            break
        out.tokens.append(t)
        out.q.append(q[j])
        out.position.append(j)
        new.append(t)
        if t in eos:
            return new, True
    return new, False
