"""The training mask against the three-rule definition of spec §1.4, element by element."""

from __future__ import annotations

import itertools

import pytest
import torch

from idlm.train.batch import Sample, collate
from idlm.train.mask import idlm_mask, packed_layout, single_layout, training_mask


def rule_mask(length: int, block: int, bidirectional: bool = False) -> torch.Tensor:
    """Spec §1.4 written out literally over the 2L concatenation (slow, obviously right); with
    ``bidirectional`` rule 1 is SDAR's: noisy tokens of one block all see each other."""
    n = length
    out = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for q, k in itertools.product(range(2 * n), repeat=2):
        q0, k0 = q >= n, k >= n
        lq, lk = (q - n if q0 else q), (k - n if k0 else k)
        bq, bk = lq // block, lk // block
        out[q, k] = ((not q0 and not k0 and bq == bk and (q >= k or bidirectional))
                     or (not q0 and k0 and bq > bk)
                     or (q0 and k0 and q >= k))
    return out


def block_diag(*mats: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*[m.int() for m in mats]).bool()


@pytest.mark.parametrize("length,block", [(1, 1), (6, 2), (7, 3), (10, 3), (9, 4), (12, 1), (5, 8)])
def test_unpacked_equals_rules(length, block):
    assert torch.equal(idlm_mask(length, block), rule_mask(length, block))


@pytest.mark.parametrize("length,block", [(1, 1), (6, 2), (7, 3), (10, 3), (9, 4), (12, 1), (5, 8)])
def test_bidirectional_block_equals_its_definition(length, block):
    got = idlm_mask(length, block, "bidirectional-block")
    assert torch.equal(got, rule_mask(length, block, bidirectional=True))
    causal = idlm_mask(length, block)
    assert torch.equal(got[length:], causal[length:])  # the clean half is unchanged
    assert torch.equal(got[:length, length:], causal[:length, length:])  # noisy -> clean unchanged
    if block > 1 and length > 1:
        assert not torch.equal(got, causal)


def test_bidirectional_example_l6_b2():
    m = idlm_mask(6, 2, "bidirectional-block").int()
    assert torch.equal(m[:6, :6], torch.block_diag(*[torch.ones(2, 2, dtype=torch.int)] * 3))


def test_unknown_attention_is_refused():
    with pytest.raises(ValueError, match="attention"):
        idlm_mask(4, 2, "full")


def test_spec_example_l6_b2():
    m = idlm_mask(6, 2).int()
    noisy = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                          [0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0],
                          [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0],
                          [0, 0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 0],
                          [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert torch.equal(m[:6], noisy)
    clean = torch.cat([torch.zeros(6, 6, dtype=torch.int), torch.ones(6, 6).tril().int()], 1)
    assert torch.equal(m[6:], clean)


@pytest.mark.parametrize("length,block", [(8, 2), (11, 3)])
def test_clean_rows_causal_and_blind_to_noisy(length, block):
    m = idlm_mask(length, block)
    assert not m[length:, :length].any()
    assert torch.equal(m[length:, length:], torch.ones(length, length, dtype=torch.bool).tril())


@pytest.mark.parametrize("lengths,block", [([3, 5], 2), ([4, 1, 6], 3), ([7, 7], 1)])
def test_packed_interleaved_is_block_diagonal_of_per_sample_masks(lengths, block):
    m = training_mask(packed_layout(lengths, interleaved=True), block)
    assert torch.equal(m, block_diag(*[rule_mask(n, block) for n in lengths]))


@pytest.mark.parametrize("lengths,block", [([3, 5], 2), ([4, 1, 6], 3)])
def test_packed_grouped_is_a_permutation_of_interleaved(lengths, block):
    grouped = training_mask(packed_layout(lengths), block)
    inter = training_mask(packed_layout(lengths, interleaved=True), block)
    # index of each grouped token inside the interleaved row
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    noisy = torch.cat([2 * s + torch.arange(n) for s, n in zip(starts, lengths)])
    clean = torch.cat([2 * s + n + torch.arange(n) for s, n in zip(starts, lengths)])
    perm = torch.cat([noisy, clean])
    assert torch.equal(grouped, inter[perm][:, perm])
    total = sum(lengths)
    assert not grouped[total:, :total].any()  # clean never sees noisy, across all samples


def _collated_vs_rules(samples: list[Sample], block: int) -> None:
    """The collator's mask (trimmed noisy halves, padding) equals the rules on the kept tokens."""
    b = collate([samples], block, mask_id=999, pad_multiple=1)
    m_full = block_diag(*[rule_mask(len(s), block) for s in samples])  # interleaved reference
    keep_noisy, keep_clean, off = [], [], 0
    for s in samples:
        start = (len(s.prompt_ids) // block) * block
        keep_noisy += [off + i for i in range(start, len(s))]
        keep_clean += [off + len(s) + i for i in range(len(s))]
        off += 2 * len(s)
    idx = torch.tensor(keep_noisy + keep_clean)
    assert torch.equal(b.attn_mask[0], m_full[idx][:, idx])


@pytest.mark.parametrize("block", [1, 2, 3, 4])
@pytest.mark.parametrize("prompt_len", [1, 3, 4, 6])
def test_collated_mask_matches_rules_for_prompt_lengths(block, prompt_len):
    _collated_vs_rules([Sample(tuple(range(10, 10 + prompt_len)), tuple(range(40, 49)))], block)


def test_collated_packed_mask_matches_rules():
    samples = [Sample((5, 6, 7), (8, 9, 10, 11, 12)), Sample((1,), (2, 3)), Sample((4, 5, 6, 7, 8), (9, 10))]
    for block in (1, 2, 3):
        _collated_vs_rules(samples, block)


def test_padding_rows_attend_somewhere():
    b = collate([[Sample((1, 2), (3, 4, 5))], [Sample((1,), (2,))]], block=2, mask_id=99, pad_multiple=8)
    assert b.attn_mask.any(-1).all()  # no all-False query row (SDPA would produce NaN)


def test_single_layout_metadata():
    lay = single_layout(4)
    assert lay.loc.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert lay.clean.tolist() == [False] * 4 + [True] * 4
