"""KV block allocation: pure Python, no tensors.

The pool holds ``num_blocks`` blocks of ``block_size`` token slots. Block 0 is reserved: it is never
handed out, stays all zeros, and is where padding keys point. A sequence owns a block table (a list
of block ids); token i of the sequence lives in slot ``table[i // block_size] * block_size + i %
block_size``. Tables only grow at the end (``allocate``) and shrink at the end (``truncate``: ISD
rollback frees the blocks past the committed length), and ``free`` returns a whole table.

Free blocks are handed out lowest id first, so a sequence that grows alone gets consecutive blocks
and the model can read its keys as one slice instead of a gather (``ModelRunner``).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable

NULL_BLOCK = 0  # reserved all-zero block: padding keys read it


class OutOfBlocks(RuntimeError):
    """``allocate`` was asked for more blocks than are free (call ``can_allocate`` first)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need at least 2 blocks of at least 1 slot, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(1, num_blocks))  # a heap (sorted is a valid heap)
        self._tables: dict[Hashable, list[int]] = {}

    @property
    def num_total(self) -> int:
        """Blocks that can ever be allocated (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_total - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def table(self, seq: Hashable) -> list[int]:
        return self._tables.get(seq, [])

    def needed(self, seq: Hashable, num_tokens: int) -> int:
        """Blocks ``seq`` still needs so that its first ``num_tokens`` slots exist."""
        return max(0, self.blocks_for(num_tokens) - len(self.table(seq)))

    def can_allocate(self, seq: Hashable, num_tokens: int) -> bool:
        return self.needed(seq, num_tokens) <= self.num_free

    def allocate(self, seq: Hashable, num_tokens: int) -> list[int]:
        """Grow ``seq``'s table (creating it) to cover ``num_tokens`` slots; returns the new blocks."""
        n = self.needed(seq, num_tokens)
        if n > self.num_free:
            raise OutOfBlocks(f"{seq!r} needs {n} blocks, {self.num_free} free")
        new = [heapq.heappop(self._free) for _ in range(n)]
        self._tables.setdefault(seq, []).extend(new)
        return new

    def truncate(self, seq: Hashable, num_tokens: int) -> int:
        """Keep the blocks holding the first ``num_tokens`` slots of ``seq``; free the rest. Returns
        how many blocks were freed."""
        table = self._tables.get(seq)
        if table is None:
            return 0
        keep = self.blocks_for(num_tokens)
        freed = table[keep:]
        del table[keep:]
        for b in freed:
            heapq.heappush(self._free, b)
        return len(freed)

    def free(self, seq: Hashable) -> int:
        """Release every block of ``seq``; returns how many."""
        n = self.truncate(seq, 0)
        self._tables.pop(seq, None)
        return n

    def check(self) -> None:
        """Assert the invariants: every block is either free or owned by exactly one table, and the
        null block is neither."""
        owned = [b for t in self._tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert not set(owned) & set(self._free), "a block is both owned and free"
        assert len(self._free) == len(set(self._free)), "a block is free twice"
        assert NULL_BLOCK not in owned and NULL_BLOCK not in self._free, "the null block was handed out"
        assert len(owned) + len(self._free) == self.num_total, "a block was lost"
