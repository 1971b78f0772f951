"""Collator: loss support (spec §2.1), draft offsets, truncation and packing."""

from __future__ import annotations

import torch

from idlm.train.batch import IGNORE, Sample, collate, epoch_rows, pack, truncate

M = 99  # MASK id used in these tests


def test_spec_worked_example_b3_l10_p4():
    x = list(range(10, 20))  # x0..x9
    s = Sample(tuple(x[:4]), tuple(x[4:]))
    b = collate([[s]], block=3, mask_id=M, pad_multiple=1, trim_prompt=False)
    noisy_ids = b.input_ids[0, :10].tolist()
    assert noisy_ids == x[:4] + [M] * 6
    assert b.input_ids[0, 10:].tolist() == x
    assert b.positions[0].tolist() == list(range(10)) * 2
    # CE_noisy: positions 4..8 predict x5..x9; 9 has no next token; prompt positions none.
    expect = [IGNORE] * 4 + x[5:10] + [IGNORE]
    assert b.noisy_targets[0].tolist() == expect
    assert b.n_response == 6  # the CE_noisy denominator: 5 terms / 6 response tokens
    # CE_clean: positions 3..8 predict x4..x9
    assert b.clean_targets[0].tolist() == [IGNORE] * 3 + x[4:10] + [IGNORE]
    # draft offsets: block 1 = {3,4,5}: M4 is 1st after clean x3, M5 2nd; block 2 = {6,7,8}: 1,2,3
    assert b.draft_k[0].tolist() == [0, 0, 0, 0, 1, 2, 1, 2, 3, 0]
    assert b.gate[0].tolist() == [0.0] * 4 + [1.0] * 6


def test_trimmed_noisy_half_starts_at_the_prompt_end_block():
    x = list(range(10, 20))
    b = collate([[Sample(tuple(x[:7]), tuple(x[7:]))]], block=3, mask_id=M, pad_multiple=1)
    assert b.n_noisy == 4  # block {6,7,8} and {9}: positions 6..9
    assert b.positions[0, :4].tolist() == [6, 7, 8, 9]
    assert b.input_ids[0, :4].tolist() == [16, M, M, M]
    assert b.noisy_targets[0].tolist() == [IGNORE, 18, 19, IGNORE]
    assert b.draft_k[0].tolist() == [0, 1, 2, 0]


def test_targets_never_cross_packed_samples():
    a, c = Sample((1, 2), (3, 4)), Sample((5,), (6, 7, 8))
    b = collate([[a, c]], block=2, mask_id=M, pad_multiple=1, trim_prompt=False)
    assert b.clean_targets[0].tolist() == [IGNORE, 3, 4, IGNORE, 6, 7, 8, IGNORE]
    assert b.noisy_targets[0].tolist() == [IGNORE, IGNORE, 4, IGNORE, IGNORE, 7, 8, IGNORE]
    assert b.n_response == 5 and b.n_seq_tokens == 16


def test_padding_carries_no_loss_and_no_gate():
    b = collate([[Sample((1, 2), (3, 4, 5))], [Sample((1,), (2,))]], block=2, mask_id=M, pad_multiple=8)
    assert b.input_ids.shape == (2, 16)
    assert (b.noisy_targets[1] != IGNORE).sum() == 0  # single response token: no next label
    assert b.gate[1].sum() == 1 and (b.clean_targets[1] != IGNORE).sum() == 1


def test_truncate_cuts_response_then_prompt():
    s = Sample(tuple(range(10)), tuple(range(100, 120)))
    t = truncate(s, 15, min_response=4)
    assert t.prompt_ids == s.prompt_ids and t.response_ids == tuple(range(100, 105))
    t = truncate(Sample(tuple(range(30)), tuple(range(100, 120))), 20, min_response=4)
    assert len(t) == 20 and t.prompt_ids == tuple(range(14, 30)) and len(t.response_ids) == 4
    assert truncate(Sample((1, 2), ()), 10) is None


def test_pack_respects_budget_and_keeps_every_sample():
    lengths = [5, 9, 3, 7, 1, 10, 4]
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)


def test_epoch_order_is_deterministic():
    samples = [Sample((1,), tuple(range(n))) for n in range(1, 20)]
    assert epoch_rows(samples, 32, 3, 1) == epoch_rows(samples, 32, 3, 1)
    assert epoch_rows(samples, 32, 3, 1) != epoch_rows(samples, 32, 3, 2)


def test_mask_dtype_and_shapes():
    b = collate([[Sample((1, 2, 3), (4, 5))]], block=2, mask_id=M)
    m, n = b.n_noisy, b.clean_targets.shape[1]
    assert b.attn_mask.dtype == torch.bool and b.attn_mask.shape == (1, m + n, m + n)


def test_row_stream_walks_epochs_of_different_sizes():
    from idlm.train.loop import RowStream

    samples = [Sample((1,), tuple(range(n))) for n in (3, 9, 5, 7, 2, 8, 4, 6)]
    stream = RowStream(samples, budget=12, seed=0)
    epochs = [epoch_rows(samples, 12, 0, e) for e in range(4)]
    flat = [row for ep in epochs for row in ep]
    got = [stream.rows(j, 1)[0] for j in range(len(flat))]
    assert got == [[samples[i] for i in row] for row in flat]
