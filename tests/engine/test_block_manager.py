"""Block manager invariants under random allocate / grow / rollback / free sequences (hypothesis).

A state machine drives a ``BlockManager`` next to a trivial model of it (each sequence's token
count) and checks after every rule: no block is owned twice, owned + free = all blocks, the null
block is never handed out, every table covers exactly its sequence's tokens (so a rollback frees
exactly the blocks past the committed length), and the free count returns to the total when every
sequence has ended.
"""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from idlm.engine.block_manager import NULL_BLOCK, BlockManager, OutOfBlocks


class BlockMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(num_blocks=33, block_size=4)  # 32 usable blocks = 128 slots
        self.tokens: dict[str, int] = {}  # the model: committed tokens per live sequence
        self.next_id = 0

    @rule(n=st.integers(1, 40))
    def add(self, n: int) -> None:
        seq = f"s{self.next_id}"
        self.next_id += 1
        if self.bm.can_allocate(seq, n):
            new = self.bm.allocate(seq, n)
            assert len(new) == -(-n // 4)
            self.tokens[seq] = n
        else:
            with pytest.raises(OutOfBlocks):
                self.bm.allocate(seq, n)
            assert self.bm.table(seq) == []  # a failed allocation changes nothing

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), extra=st.integers(0, 30))
    def extend(self, data, extra: int) -> None:  # an ISD window or a prompt chunk
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        n = self.tokens[seq] + extra
        if self.bm.can_allocate(seq, n):
            self.bm.allocate(seq, n)
            self.tokens[seq] = n

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def rollback(self, data) -> None:  # keep the verified prefix, free the rest of the window
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        keep = data.draw(st.integers(0, self.tokens[seq]))
        before = len(self.bm.table(seq))
        freed = self.bm.truncate(seq, keep)
        assert freed == before - -(-keep // 4)  # exactly the blocks past the committed length
        self.tokens[seq] = keep

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def free(self, data) -> None:  # finish, abort or preempt
        seq = data.draw(st.sampled_from(sorted(self.tokens)))
        self.bm.free(seq)
        del self.tokens[seq]
        assert self.bm.table(seq) == []

    @invariant()
    def consistent(self) -> None:
        self.bm.check()
        owned = [b for s in self.tokens for b in self.bm.table(s)]
        assert NULL_BLOCK not in owned
        for seq, n in self.tokens.items():
            assert len(self.bm.table(seq)) == -(-n // 4)
        assert self.bm.num_used == len(owned)

    def teardown(self) -> None:
        for seq in list(self.tokens):
            self.bm.free(seq)
        assert self.bm.num_free == self.bm.num_total == 32


TestBlockManager = BlockMachine.TestCase
TestBlockManager.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


def test_lowest_free_blocks_first_keeps_a_lone_sequence_contiguous() -> None:
    bm = BlockManager(num_blocks=20, block_size=4)
    bm.allocate("a", 10)
    bm.truncate("a", 5)  # rollback: frees the third block
    bm.allocate("a", 17)  # regrows into the freed block and the next ones
    assert bm.table("a") == [1, 2, 3, 4, 5]
