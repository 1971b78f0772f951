"""The I-DLM training attention mask (spec §1.4) over a ``[x_t | x_0]`` row, dense and vectorised.

Every token of a row is described by three per-token tensors:

* ``sample``: which packed sample it belongs to (padding is one more dummy sample),
* ``loc``: its index inside that sample (= its position id; both halves reuse 0..L-1, spec §1.3),
* ``clean``: True in the x_0 half, False in the x_t (noisy) half.

Query q may attend key k iff they are in the same sample and one of the three rules holds
(``blk = loc // B``):

1. both noisy, same block, ``loc(q) >= loc(k)``   (within-block causal on the noisy side)
2. q noisy, k clean, ``blk(q) > blk(k)``           (noisy → clean of strictly earlier blocks)
3. both clean, ``loc(q) >= loc(k)``                (plain causal on the clean side)

``attention="bidirectional-block"`` is the SDAR-style baseline the paper contrasts I-DLM with
(``use_regular_causal=False`` in the reference): rule 1 drops ``loc(q) >= loc(k)``, so a noisy token
sees every noisy token of its own block, before and after it. Rules 2 and 3 are unchanged.

Because the rules only look at this metadata, the order of tokens in a row does not matter: the
spec's interleaved packing ``[x_t^1, x_0^1, x_t^2, x_0^2, ...]`` and our grouped layout
``[x_t^1, x_t^2, ... | x_0^1, x_0^2, ...]`` give the same attention up to a permutation. We use the
grouped layout so the clean half is one contiguous slice (LoRA mode runs it once, without
gradients, as a prefix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Per-token metadata of one or more rows, each tensor (..., T)."""

    sample: torch.Tensor  # int: packed-sample index (padding = its own dummy sample)
    loc: torch.Tensor  # int: index inside the sample = position id
    clean: torch.Tensor  # bool: True = x_0 half, False = x_t half


ATTENTIONS = ("causal", "bidirectional-block")


def training_mask(layout: RowLayout, block: int, attention: str = "causal") -> torch.Tensor:
    """(..., T, T) bool, True = may attend; the three rules of spec §1.4, per sample (rule 1 without
    its causal condition for ``attention="bidirectional-block"``)."""
    if block < 1:
        raise ValueError(f"training block size must be >= 1, got {block}")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
    s, loc, clean = layout.sample, layout.loc, layout.clean
    blk = loc // block
    same = s[..., :, None] == s[..., None, :]
    causal = loc[..., :, None] >= loc[..., None, :]
    q_clean, k_clean = clean[..., :, None], clean[..., None, :]
    same_blk = blk[..., :, None] == blk[..., None, :]
    earlier_blk = blk[..., :, None] > blk[..., None, :]
    rule1 = ~q_clean & ~k_clean & same_blk & (causal if attention == "causal" else True)
    rule2 = ~q_clean & k_clean & earlier_blk
    rule3 = q_clean & k_clean & causal
    return same & (rule1 | rule2 | rule3)


def single_layout(length: int) -> RowLayout:
    """Unpacked ``[x_t | x_0]`` of one sample of ``length`` tokens (2·length entries)."""
    loc = torch.arange(length).repeat(2)
    clean = torch.arange(2 * length) >= length
    return RowLayout(torch.zeros(2 * length, dtype=torch.long), loc, clean)


def packed_layout(lengths: list[int], interleaved: bool = False) -> RowLayout:
    """Several samples in one row: grouped ``[x_t^1..x_t^k | x_0^1..x_0^k]`` (default) or the spec's
    interleaved ``[x_t^1, x_0^1, x_t^2, x_0^2, ...]``."""
    ids = torch.arange(len(lengths)).repeat_interleave(torch.tensor(lengths, dtype=torch.long))
    loc = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    if not interleaved:
        return RowLayout(ids.repeat(2), loc.repeat(2), torch.arange(2 * len(ids)) >= len(ids))
    parts = [(torch.full((2 * n,), i), torch.arange(n).repeat(2), torch.arange(2 * n) >= n)
             for i, n in enumerate(lengths)]
    return RowLayout(*(torch.cat(p) for p in zip(*parts)))


def idlm_mask(length: int, block: int, attention: str = "causal") -> torch.Tensor:
    """(2L, 2L) mask of one unpacked sample."""
    return training_mask(single_layout(length), block, attention)
