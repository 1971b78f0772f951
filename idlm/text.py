"""Token ids → text, incrementally, and text-level stop strings: what a streaming client sees (CLI
``generate``, the server).

Decoding token by token breaks multi-byte characters and merges (a UTF-8 character split over two
tokens, a leading space that belongs to the next word), so each push decodes a short window of
recent tokens twice, with and without the new ones, and emits only the text that is new and complete
(a trailing U+FFFD means a character is still incomplete: wait for the next token)."""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window
        self.read = 0  # tokens whose text was already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self.ids += new_ids
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class StopStrings:
    """Text-level stop strings over a stream of text pieces: ``push`` returns the text that is safe
    to send now, cut exactly before the first stop string, even one that spans pieces. Only a tail
    that could still be the start of a stop string is held back."""

    def __init__(self, stops: list[str] | tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.matched: str | None = None  # the stop string that ended the text

    def _hold(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, piece: str) -> str:
        if self.matched is not None:
            return ""
        text = self.held + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits, key=lambda h: h[0])
            self.held = ""
            return text[:i]
        k = self._hold(text)
        self.held = text[len(text) - k:] if k else ""
        return text[: len(text) - k]

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never became a stop string)."""
        out, self.held = ("" if self.matched is not None else self.held), ""
        return out
