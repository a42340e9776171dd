"""From generated token ids to text: whole characters only, and stop strings cut exactly.

A byte-level BPE token can end inside a UTF-8 character, and a stop string can be split over
several tokens, so text is shown only once it can no longer change: a trailing replacement
character waits for the rest of its bytes, and a tail that could still grow into a stop string
waits until it cannot. `lmforge generate` streams through a `TextStream`; `generate_batch` feeds
one per row to find where each row's stop string ends.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    """Token ids in (`push`), text out: the pieces that are safe to show, in order.

    decode: ids -> text (a tokenizer's decode). stop: strings that end the text; the text is cut
    just before the first occurrence of any of them, and `stopped` turns True on the token that
    completes it (`n_tokens` then counts the tokens up to and including that one).
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.shown = ""  # the text handed out so far
        self.stopped = False

    @property
    def n_tokens(self) -> int:
        return len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; the new text that is now safe to show ("" while it is held back)."""
        if self.stopped:
            raise ValueError("TextStream: a token pushed after a stop string")
        self.ids.append(token_id)
        # Decode the whole continuation: a token's bytes may complete a character begun earlier.
        text = self.decode(self.ids)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._show(text[:cut])
        if text.endswith("\ufffd"):
            return ""  # the last character's bytes are not all here yet
        return self._show(text[: len(text) - self._stop_prefix_len(text)])

    def finish(self) -> str:
        """The text held back when no more tokens come (a tail that never became a stop string)."""
        if self.stopped:
            return ""
        return self._show(self.decode(self.ids))

    @property
    def text(self) -> str:
        """Everything shown so far (after `finish`, the whole text, cut before any stop string)."""
        return self.shown

    def _show(self, text: str) -> str:
        if not text.startswith(self.shown):
            # A decode that rewrote text already shown (a tokenizer that is not prefix-stable):
            # nothing can be taken back, so show only what extends it.
            return ""
        piece = text[len(self.shown) :]
        self.shown = text
        return piece

    def _first_stop(self, text: str) -> int | None:
        # Only the part not shown yet can hold a new occurrence, plus a stop string's length of
        # context before it (an occurrence that began in shown text would have been held back).
        start = max(0, len(self.shown) - max((len(s) for s in self.stop), default=0))
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is the beginning of a stop string."""
        longest = 0
        for stop in self.stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
