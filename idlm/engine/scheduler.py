"""Continuous batching: which requests run in the next forward and what each contributes.

Pure Python over ``Request`` objects and the ``BlockManager``; no tensors. One scheduling model
(architecture.md §10): every item extends a request's KV by k slots and later keeps m ≤ k of them —
a prompt chunk keeps all of its slots, an ISD window keeps 1 + accepted, an AR step keeps 1.

Each step:

1. every running request that has finished its prefill gets a decode window (its stride this step
   comes from the request, or from the load-adaptive ``StridePolicy`` for ``--stride auto``); if
   its window's blocks cannot be allocated, the newest running request is preempted (its blocks are
   freed and it is queued to recompute; its output and decoder state are kept) until they can;
2. requests still prefilling get prompt chunks from what is left of the token budget, oldest first
   (so a long prompt is spread over several steps and never stalls the decoders);
3. waiting requests are admitted while there is room (running cap, budget, free blocks beyond a
   reserve of one block per decoder).

When the same requests decode again with nothing admitted, preempted or finished, the step is
``stationary`` and the model runner reuses its batch state (spec §5.3).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from ..decode import Window, build_window
from .block_manager import BlockManager
from .request import Request, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_running: int = 16  # requests holding KV at once (prefilling or decoding)
    max_batched_tokens: int = 512  # tokens per forward: decode windows first, prompt chunks get the rest
    min_prefill_chunk: int = 32  # the oldest prefilling request advances at least this much per step


@dataclass
class ScheduledItem:
    """One request's part of the next forward."""

    request: Request
    start: int  # first KV slot written (the request's committed length)
    ids: list[int]  # input ids: a prompt chunk, or an ISD / AR window
    window: Window | None  # the decode window (None for a prompt chunk)
    sample: bool = False  # a prompt chunk that completes a fresh prefill: its last row gives token 0

    @property
    def positions(self) -> list[int]:
        offsets = self.window.offsets if self.window is not None else range(len(self.ids))
        return [self.start + o for o in offsets]

    @property
    def read_rows(self) -> range:
        """Rows whose logits are needed: a window's used slots; a prompt chunk's last row if it samples,
        every row if the request scores its prompt."""
        if self.window is not None:
            return range(self.window.used)
        if self.request.scores_prompt:
            return range(len(self.ids))
        return range(len(self.ids) - 1, len(self.ids)) if self.sample else range(0)


@dataclass
class SchedulerOutput:
    items: list[ScheduledItem]  # decode windows first (oldest first), then prompt chunks
    preempted: list[Request]  # requests whose blocks were freed this step
    stationary: bool  # the same requests decode as in the previous step, nothing else happens


class StridePolicy(Protocol):
    def choose(self, requests: list[Request], other_rows: int) -> dict[str, tuple[int, bool]]:
        """(drafts N-1, fallback on?) for each adaptive (auto stride or fallback) request decoding now."""
        ...


class Scheduler:
    def __init__(self, cfg: SchedulerConfig, blocks: BlockManager, mask_id: int, policy: StridePolicy | None = None):
        self.cfg, self.blocks, self.mask_id, self.policy = cfg, blocks, mask_id, policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest first
        self._last_decode: tuple[str, ...] = ()

    def add(self, req: Request) -> None:
        req.status = Status.WAITING
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Drop a finished or aborted request and release every block it holds."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.id)
        req.status = Status.FINISHED

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> SchedulerOutput:
        preempted: list[Request] = []
        items = self._decode_items(preempted)
        budget = self.cfg.max_batched_tokens - sum(len(it.ids) for it in items)
        n_decode = len(items)
        for req in [r for r in self.running if r.prefilling]:
            it = self._prefill_item(req, budget, first=len(items) == n_decode)
            if it is not None:
                items.append(it)
                budget -= len(it.ids)
        admitted = self._admit(items, budget, n_decode)
        ids = tuple(it.request.id for it in items[:n_decode])
        stationary = bool(ids) and ids == self._last_decode and len(items) == n_decode and not preempted \
            and not admitted
        self._last_decode = ids
        return SchedulerOutput(items, preempted, stationary)

    # -- decode windows ---------------------------------------------------------------------------

    def _decode_items(self, preempted: list[Request]) -> list[ScheduledItem]:
        decoding = [r for r in self.running if not r.prefilling]
        adaptive = [r for r in decoding if r.adaptive]
        chosen = {}
        if adaptive and self.policy is not None:
            other = sum(min(r.committed_len - r.num_computed, self.cfg.max_batched_tokens)
                        for r in self.running if r.prefilling)
            other += sum(r.decode.window for r in decoding if not r.adaptive)
            chosen = self.policy.choose(adaptive, other)
        items = []
        for req in decoding:
            if req.status is not Status.RUNNING:  # preempted while making room for an older one
                continue
            n_drafts, fallback = chosen.get(req.id, (req.decode.max_stride - 1, req.decode.may_fallback))
            pad = req.decode.window if req.decode.pad_windows and not req.decode.auto else 0
            win = build_window(req.state, n_drafts, fallback, self.mask_id, pad, req.decode.tree)
            if not self._make_room(req, req.num_computed + len(win.ids), preempted):
                continue
            items.append(ScheduledItem(req, req.num_computed, win.ids, win))
        return items

    def _make_room(self, req: Request, num_tokens: int, preempted: list[Request]) -> bool:
        """Allocate ``req``'s blocks up to ``num_tokens`` slots, preempting the newest running
        requests while they do not fit. False if ``req`` itself had to go."""
        while not self.blocks.can_allocate(req.id, num_tokens):
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is req:
                return False
        self.blocks.allocate(req.id, num_tokens)
        return True

    def _preempt(self, req: Request) -> None:
        """Free every block of ``req`` and queue it first to recompute its committed text. Its output,
        decoder state and random sources are kept, so it resumes exactly where it was."""
        self.running.remove(req)
        self.blocks.free(req.id)
        req.num_computed = 0
        req.status = Status.WAITING
        req.stats.preemptions += 1
        self.waiting.appendleft(req)

    # -- prompt chunks ----------------------------------------------------------------------------

    def _prefill_item(self, req: Request, budget: int, first: bool) -> ScheduledItem | None:
        left = req.committed_len - req.num_computed
        chunk = min(left, max(budget, self.cfg.min_prefill_chunk if first else 0))
        free_slots = self.blocks.num_free * self.blocks.block_size + \
            len(self.blocks.table(req.id)) * self.blocks.block_size - req.num_computed
        chunk = min(chunk, free_slots)
        if chunk <= 0:
            return None
        end = req.num_computed + chunk
        self.blocks.allocate(req.id, end)
        sample = end == req.committed_len and req.state is None
        return ScheduledItem(req, req.num_computed, req.committed_tokens(req.num_computed, end), None, sample)

    def _admit(self, items: list[ScheduledItem], budget: int, n_decode: int) -> list[Request]:
        admitted = []
        reserve = n_decode  # keep a block per decoder free for its next window
        while self.waiting and len(self.running) < self.cfg.max_running:
            req = self.waiting[0]
            first = len(items) == n_decode
            if budget <= 0 and not first:
                break
            need_first = min(req.committed_len, max(budget, self.cfg.min_prefill_chunk if first else 0))
            if self.blocks.needed(req.id, need_first) + reserve > self.blocks.num_free:
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            self.running.sort(key=lambda r: r.arrival)
            admitted.append(req)
            it = self._prefill_item(req, budget, first)
            if it is not None:
                items.append(it)
                budget -= len(it.ids)
        return admitted
