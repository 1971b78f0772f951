"""Incremental detokenization and text-level stop strings (what a streaming client sees)."""

from __future__ import annotations

import random

import pytest

from idlm.text import IncrementalDetokenizer, StopStrings


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], str | None]:
    s = StopStrings(stops)
    out = [s.push(p) for p in pieces]
    if s.matched is None:
        out.append(s.flush())
    return out, s.matched


def test_stop_string_inside_one_piece_and_across_pieces() -> None:
    out, hit = feed(["END"], ["hello E", "N", "D and more"])
    assert "".join(out) == "hello " and hit == "END"
    assert out[0] == "hello "  # "E" could begin the stop string: held back, nothing else is
    out, hit = feed(["END"], ["hello E", "N", "o"])  # a false start is released
    assert "".join(out) == "hello ENo" and hit is None


def test_earliest_stop_wins_and_overlapping_prefixes() -> None:
    out, hit = feed(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert "".join(out) == "hel" and hit == "lo w"
    out, hit = feed(["aab"], ["a", "a", "a", "b", "c"])  # "aaab": the match starts at the second "a"
    assert "".join(out) == "a" and hit == "aab"


def test_random_splits_equal_cutting_the_whole_text() -> None:
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab c\n") for _ in range(40))
        stops = ["".join(rng.choice("ab c") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        cuts = sorted(rng.sample(range(1, 40), 6))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, 40])]
        hits = [(text.find(s), s) for s in stops if s in text]
        want = text[: min(hits)[0]] if hits else text
        got, _ = feed(stops, pieces)
        assert "".join(got) == want


class ByteTokenizer:
    """Token i = one UTF-8 byte; decoding an incomplete character gives U+FFFD, like real tokenizers."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🙂 ok"])
def test_detokenizer_never_emits_a_broken_character(text: str) -> None:
    tok = ByteTokenizer()
    d = IncrementalDetokenizer(tok)
    pieces = [d.push([b]) for b in text.encode()]
    pieces.append(d.flush())
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
