"""Model runner: a scheduled step → one flat ragged batch → the model → the logit rows each item reads.

Layout of a step (T tokens in all):

* ids / positions / gate: every item's tokens back to back (decode windows first, then prompt chunks);
  positions are explicit (``start + offsets``; fallback branches repeat positions);
* write slots: the pool slot of every token, from the request's block table, in window order;
* attention groups: all decode windows attend together (padded to the longest window and key range);
  each prompt chunk is its own group (so a 500-token chunk does not pad 16 windows to 500 rows).
  A group of one request whose blocks are consecutive reads its keys as a slice of the pool;
* the R-ISD gate is 1 on draft MASK rows only, whichever request they belong to.

Row-stable kernels (``idlm.model.kernels``, the native forward) make every row's numbers the same
as in the batch-1 decoder, whatever else is in the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..model.attention import padded_keys, prefix_window_bias
from ..model.decoder import AttnGroup, Decoder, PagedBatch, PagedKV
from ..model.native import NativeRows
from .block_manager import NULL_BLOCK, BlockManager
from .scheduler import ScheduledItem


@dataclass
class StepLogits:
    """The logits each item reads, in item order."""

    rows: list[torch.Tensor]  # item i: (read_rows_i, V) fp32 (empty for a prompt chunk that samples nothing)
    prepare_s: float  # building the batch tensors
    forward_s: float  # model forward + logits
    num_rows: int  # tokens in the forward (padding included)
    num_gated: int  # rows with the R-ISD adapter gate on


class ModelRunner:
    def __init__(self, model: Decoder, pool: PagedKV, blocks: BlockManager):
        self.model, self.pool, self.blocks = model, pool, blocks
        self.bs = blocks.block_size
        self.total_slots = pool.k.shape[2]
        self.gated = model.has_adapters
        self.device = pool.k.device
        self._tables: _Tables | None = None  # the decode group's block tables, kept across stationary steps
        self.native = model.runs_native  # the native forward takes a per-row key layout, not attention groups

    @torch.inference_mode()
    def run(self, items: list[ScheduledItem], stationary: bool = False) -> StepLogits:
        """One forward for ``items``. ``stationary``: the same requests decode as last step, so the
        batch state (the decode group's block-table tensor) is updated in place, not rebuilt."""
        self._stationary = stationary
        t0 = time.perf_counter()
        ids, pos, gate, write, bases = [], [], [], [], []
        for it in items:
            bases.append(len(ids))
            ids += it.ids
            pos += it.positions
            write += self._slots(it.request.id, it.start, it.start + len(it.ids))
            if self.gated:
                gate += it.window.gate().tolist() if it.window is not None else [0.0] * len(it.ids)
        pad = bucket(len(ids)) - len(ids)  # padding rows: bounded matmul shapes, so kernels are reused
        contiguous = write == list(range(write[0], write[0] + len(write)))
        if self.native:
            batch = PagedBatch(self._t(write), [], None, self.bs, native=self._native_rows(items, len(ids) + pad))
        else:
            decode = [i for i, it in enumerate(items) if it.window is not None]
            groups = [self._group([items[i] for i in decode], [bases[i] for i in decode])] if decode else []
            groups += [self._group([it], [b]) for it, b in zip(items, bases) if it.window is None]
            batch = PagedBatch(self._t(write), groups, write[0] if contiguous else None, self.bs)
        read = [b + r for it, b in zip(items, bases) for r in it.read_rows]
        ids, pos = ids + [0] * pad, pos + [0] * pad
        gate_t = self._t(gate + [0.0] * pad, torch.float32) if self.gated and any(gate) else None
        t1 = time.perf_counter()
        hidden = self.model.hidden_paged(self._t(ids), self._t(pos), self.pool, batch, gate_t)
        mask_id = self.model.cfg.mask_token_id
        drafts = self._t([ids[r] == mask_id for r in read], torch.bool) if self.model.draft_vocab is not None else None
        logits = self.model.logits(hidden[self._t(read)], drafts) if read else hidden.new_empty(0, 0)
        logits = logits.cpu()  # decoding (sampling, verification) is host-side, one copy per step
        t2 = time.perf_counter()
        out, k = [], 0
        for it in items:
            n = len(it.read_rows)
            out.append(logits[k: k + n])
            k += n
        return StepLogits(out, t1 - t0, t2 - t1, len(ids), int(sum(gate)))


    def _native_rows(self, items: list[ScheduledItem], total: int) -> NativeRows:
        """The native forward's layout: each token's sequence (its block table), the logical keys it sees
        (a causal prefix, plus the window slots its mask shows for an ISD window) and padding rows (-1)."""
        seq: list[int] = []
        ctx: list[int] = []
        ws: list[int] = []
        masked = []
        for k, it in enumerate(items):
            n, s = len(it.ids), it.start
            mask = it.window.mask if it.window is not None else None
            if mask is None:
                ctx += range(s + 1, s + n + 1)
            else:
                masked.append((len(seq), mask))
                ctx += [s] * n
            seq += [k] * n
            ws += [s] * n
        pad = total - len(seq)
        width = max((m.shape[1] for _, m in masked), default=0)
        win = torch.zeros(total, width, dtype=torch.uint8)
        for base, m in masked:
            win[base: base + m.shape[0], : m.shape[1]] = m
        tables = [self.blocks.table(it.request.id) for it in items]
        nb = max(len(t) for t in tables)
        return NativeRows(self._t(seq + [-1] * pad), self._t(ctx + [0] * pad), self._t(ws + [0] * pad), win,
                          self._t([t + [NULL_BLOCK] * (nb - len(t)) for t in tables]), self.bs)

    def _t(self, data, dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, device=self.device)

    def _slots(self, seq: str, start: int, end: int) -> list[int]:
        table, bs = self.blocks.table(seq), self.bs
        return [table[i // bs] * bs + i % bs for i in range(start, end)]

    def _group(self, items: list[ScheduledItem], bases: list[int]) -> AttnGroup:
        """Items that attend together: rows (R, T), the visibility bias (R, T, S) and the key slots."""
        r = len(items)
        lens = [len(it.ids) for it in items]
        t = max(lens)
        s = padded_keys(max(it.start + n for it, n in zip(items, lens)))
        rows = self._t([[b + min(i, n - 1) for i in range(t)] for b, n in zip(bases, lens)])
        win = torch.zeros(r, t, t, dtype=torch.bool)
        for k, (it, n) in enumerate(zip(items, lens)):
            mask = it.window.mask if it.window is not None else None
            win[k, :n, :n] = mask if mask is not None else torch.ones(n, n, dtype=torch.bool).tril()
            win[k, n:, 0] = True  # padding rows see one key (their output is dropped)
        bias = prefix_window_bias(self._t([it.start for it in items]), win.to(self.device), s)
        src = self._t([k * t + i for k, n in enumerate(lens) for i in range(n)])
        dst = self._t([b + i for b, n in zip(bases, lens) for i in range(n)])
        dense = bases == [k * t for k in range(r)] and all(n == t for n in lens)
        if r == 1:
            table = self.blocks.table(items[0].request.id)
            first = table[0] * self.bs
            if table == list(range(table[0], table[0] + len(table))) and first + s <= self.total_slots:
                return AttnGroup(rows, bias, src, dst, key_range=first, dense=dense)
        return AttnGroup(rows, bias, src, dst, key_blocks=self._key_blocks(items, s), dense=dense)

    def _key_blocks(self, items: list[ScheduledItem], s: int) -> torch.Tensor:
        """(R, S / block_size) pool block of each run of keys; past a table: the null block. For a
        decode group in a stationary step only the rows whose table changed are rewritten."""
        width = s // self.bs
        ids = tuple(it.request.id for it in items)
        tables = [self.blocks.table(i) for i in ids]
        cache = self._tables
        if not (self._stationary and items[0].window is not None and cache is not None and cache.ids == ids
                and cache.tensor.shape[1] >= width):
            cap = max(width, 2 * max(len(t) for t in tables))
            cache = _Tables(ids, [list(t) for t in tables],
                            self._t([t[:cap] + [NULL_BLOCK] * (cap - len(t[:cap])) for t in tables]))
            if items[0].window is not None:
                self._tables = cache
            return cache.tensor[:, :width]
        cap = cache.tensor.shape[1]
        for k, t in enumerate(tables):
            if t != cache.rows[k]:
                row = t[:cap]
                cache.tensor[k] = self._t(row + [NULL_BLOCK] * (cap - len(row)))
                cache.rows[k] = list(t)
        return cache.tensor[:, :width]


@dataclass
class _Tables:
    """Block tables of a decode group as a padded tensor, reused while the group is stationary."""

    ids: tuple[str, ...]  # the requests, in row order
    rows: list[list[int]]  # each request's table when its row was last written
    tensor: torch.Tensor  # (R, capacity) block ids, padded with the null block


def bucket(n: int) -> int:
    """Row count of a batch of n tokens, rounded up so that few distinct matmul shapes occur: oneDNN
    compiles a kernel for every new shape (~1 ms each) and the engine's batch size changes every
    step. Exact up to 16 (single requests repeat their few shapes), then multiples of 8, then of 32."""
    if n <= 16:
        return n
    if n <= 128:
        return -(-n // 8) * 8
    return -(-n // 32) * 32
