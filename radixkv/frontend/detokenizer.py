"""Incremental detokenization and stop strings: turn a growing token list into safe text deltas.

A byte-level tokenizer can split one character (an emoji, a CJK ideograph) across tokens; decoding
such a prefix yields U+FFFD. `IncrementalDetokenizer` holds back any delta that ends in U+FFFD until
the following tokens complete the character, so streamed text is never broken UTF-8.
`StopStrings` finds the first stop string in the text and tells how much of the tail must be held
back because it could still grow into one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes output tokens a few at a time, re-decoding a small window of earlier tokens.

    `prefix_offset:read_offset` is the window already turned into text; decoding
    `ids[prefix_offset:]` and dropping that window's text gives the new characters, with the context
    some tokenizers need to place spaces right.
    """

    __slots__ = ("ids", "prefix_offset", "read_offset", "skip_special_tokens", "tokenizer")

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        text: str = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return text

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text they complete ("" while a character is still partial)."""
        self.ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back (at the end of a request, even if it is incomplete)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        window = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(window) or (full.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full[len(window) :]


class StopStrings:
    """The stop strings of one request; matching is on the decoded output text."""

    __slots__ = ("max_len", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.max_len = max((len(s) for s in self.stops), default=0)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def find(self, text: str, start: int = 0) -> int | None:
        """Index of the earliest stop string in `text` that ends after `start`, or None.

        Pass the length the text had at the previous call as `start`: only a match that uses a new
        character can be new.
        """
        lo = max(0, start - self.max_len + 1)
        hits = [i for i in (text.find(s, lo) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(self.max_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0
