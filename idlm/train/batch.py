"""Collator: (prompt ids, response ids) samples → ``[x_t | x_0]`` training rows (spec §1.3, §2.1).

A row is ``[noisy half | clean half]`` (grouped layout, see ``mask.py``):

* clean half: every packed sample's tokens ``x_0`` (positions 0..L-1 per sample), then padding;
* noisy half: the same samples with every response token replaced by MASK, then padding. With
  ``trim_prompt`` (default) a sample's noisy half starts at the training block that contains its
  first response token: noisy prompt tokens of earlier blocks are seen by no loss position (rule 1
  keeps them inside their own, all-prompt block), so dropping them changes no loss and saves work.

Targets use the logit shift (spec §1.5): the hidden state at position i predicts x[i+1] in both
halves, never across a sample boundary. Padding is one extra dummy all-prompt sample, so every
query row of the mask attends to at least itself and no loss is ever taken on it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from ..data.records import Sample
from .mask import RowLayout, training_mask

IGNORE = -100  # target value meaning "no loss here"


@dataclass
class TrainBatch:
    """One micro-batch of packed ``[x_t | x_0]`` rows; R rows, m noisy + n clean slots each."""

    input_ids: torch.Tensor  # (R, m + n) long: [noisy | clean]
    positions: torch.Tensor  # (R, m + n) long: index inside each sample (both halves reuse 0..L-1)
    attn_mask: torch.Tensor  # (R, m + n, m + n) bool, spec §1.4, True = attend
    gate: torch.Tensor  # (R, m) float 0/1: 1 at MASK slots (gated LoRA on), 0 elsewhere
    noisy_targets: torch.Tensor  # (R, m) long: x[i+1] at masked response slots with a next token, else -100
    clean_targets: torch.Tensor  # (R, n) long: x[i+1] where that is a response token, else -100
    draft_k: torch.Tensor  # (R, m) long: MASK's rank k (1..B) after the last visible clean token; 0 = no loss
    clean_index: torch.Tensor  # (R, m) long: the clean-half slot of the same sample and position (whose
    #   hidden state predicts the same next token, the soft target's teacher row); -1 at padding
    block: int  # training block size B (MASKs per block)
    n_samples: int  # samples packed into this batch
    n_response: int  # response tokens in the batch = CE_noisy denominator (spec §2.1)
    n_seq_tokens: int  # 2·Σ L: length of the untrimmed [x_t | x_0] sequences (the throughput unit)

    @property
    def n_noisy(self) -> int:
        return self.noisy_targets.shape[1]

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return TrainBatch(**moved)


def truncate(sample: Sample, max_len: int, min_response: int = 16) -> Sample | None:
    """Cut to ``max_len`` tokens ("cut", not drop): keep the prompt's tail if the prompt alone is too
    long (leaving room for ``min_response`` response tokens), then cut the response's end.
    Returns None when no response token is left."""
    if len(sample) <= max_len:
        return sample if sample.response_ids else None
    reserve = min(min_response, len(sample.response_ids), max_len - 1)  # response room to keep
    keep_prompt = min(len(sample.prompt_ids), max_len - reserve)
    prompt = sample.prompt_ids[len(sample.prompt_ids) - keep_prompt:]
    response = sample.response_ids[: max_len - len(prompt)]
    return Sample(prompt, response) if response else None


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit packing of sample indices (in the given order) into rows of at most ``budget`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"sample {i} has {n} tokens > row budget {budget} (truncate first)")
        j = next((r for r, free in enumerate(room) if free >= n), None)
        if j is None:
            rows.append([])
            room.append(budget)
            j = len(rows) - 1
        rows[j].append(i)
        room[j] -= n
    return rows


def epoch_rows(samples: list[Sample], budget: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed rows of one epoch: a seeded shuffle (so a resumed run sees the same order), then
    first-fit packing, then a shuffle of the rows."""
    order = list(range(len(samples)))
    rng = random.Random(seed * 1_000_003 + epoch)
    rng.shuffle(order)
    rows = [[order[i] for i in row] for row in pack([len(samples[i]) for i in order], budget)]
    rng.shuffle(rows)
    return rows


@dataclass
class _Part:
    """Token ids and metadata of one half of one sample (or of the padding)."""

    ids: list[int]
    loc: list[int]
    targets: list[int]
    draft_k: list[int]


def _halves(s: Sample, block: int, mask_id: int, trim_prompt: bool) -> tuple[_Part, _Part]:
    x = list(s.prompt_ids) + list(s.response_ids)
    p, n = len(s.prompt_ids), len(x)
    nxt = [x[i + 1] if i + 1 < n and i + 1 >= p else IGNORE for i in range(n)]  # shifted labels
    start = (p // block) * block if trim_prompt else 0
    noisy = _Part([], [], [], [])
    for i in range(start, n):
        noisy.ids.append(mask_id if i >= p else x[i])
        noisy.loc.append(i)
        t = nxt[i] if i >= p else IGNORE
        noisy.targets.append(t)
        noisy.draft_k.append(i - max((i // block) * block, p) + 1 if t != IGNORE else 0)
    clean = _Part(x, list(range(n)), nxt, [0] * n)
    return noisy, clean


def _pad_part(size: int, pad_id: int) -> _Part:
    return _Part([pad_id] * size, list(range(size)), [IGNORE] * size, [0] * size)


def _row(samples: list[Sample], m: int, n: int, block: int, mask_id: int, pad_id: int,
         trim_prompt: bool, attention: str) -> dict[str, torch.Tensor]:
    parts = [_halves(s, block, mask_id, trim_prompt) for s in samples]
    noisy, clean = [p[0] for p in parts], [p[1] for p in parts]
    sid_noisy = [i for i, p in enumerate(noisy) for _ in p.ids]
    sid_clean = [i for i, p in enumerate(clean) for _ in p.ids]
    clean_index, offset = [], 0  # noisy slot (sample s, loc i) -> clean slot offset(s) + i
    for nz, cl in zip(noisy, clean):
        clean_index += [offset + loc for loc in nz.loc]
        offset += len(cl.ids)
    clean_index += [-1] * (m - len(clean_index))
    pad = len(samples)  # dummy sample id of the padding
    noisy.append(_pad_part(m - len(sid_noisy), pad_id))
    clean.append(_pad_part(n - len(sid_clean), pad_id))
    sid = sid_noisy + [pad] * (m - len(sid_noisy)) + sid_clean + [pad] * (n - len(sid_clean))

    def cat(parts: list[_Part], field: str) -> list[int]:
        return [v for p in parts for v in getattr(p, field)]

    layout = RowLayout(torch.tensor(sid), torch.tensor(cat(noisy, "loc") + cat(clean, "loc")),
                       torch.arange(m + n) >= m)
    ids = torch.tensor(cat(noisy, "ids") + cat(clean, "ids"))
    return {"input_ids": ids, "positions": layout.loc, "attn_mask": training_mask(layout, block, attention),
            "gate": (ids[:m] == mask_id).float(), "noisy_targets": torch.tensor(cat(noisy, "targets")),
            "clean_targets": torch.tensor(cat(clean, "targets")),
            "draft_k": torch.tensor(cat(noisy, "draft_k")), "clean_index": torch.tensor(clean_index)}


def collate(rows: list[list[Sample]], block: int, mask_id: int, pad_id: int = 0, pad_multiple: int = 8,
            trim_prompt: bool = True, attention: str = "causal") -> TrainBatch:
    """Build a micro-batch from packed rows (each a list of samples sharing one row)."""
    if block < 1:
        raise ValueError(f"training block size must be >= 1, got {block}")

    def round_up(v: int) -> int:
        return max(pad_multiple, -(-v // pad_multiple) * pad_multiple)

    def noisy_len(s: Sample) -> int:
        return len(s) - ((len(s.prompt_ids) // block) * block if trim_prompt else 0)

    m = round_up(max(sum(noisy_len(s) for s in row) for row in rows))
    n = round_up(max(sum(len(s) for s in row) for row in rows))
    built = [_row(row, m, n, block, mask_id, pad_id, trim_prompt, attention) for row in rows]
    stacked = {k: torch.stack([b[k] for b in built]) for k in built[0]}
    flat = [s for row in rows for s in row]
    return TrainBatch(**stacked, block=block, n_samples=len(flat),
                      n_response=sum(len(s.response_ids) for s in flat),
                      n_seq_tokens=2 * sum(len(s) for s in flat))
