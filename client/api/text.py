"""From one choice's tokens to text deltas, holding back what may still change.

A delta is only sent once it is final: text that ends in an incomplete UTF-8 sequence (a
trailing U+FFFD) may become another character with the next token, and text that ends with the
beginning of a stop string may turn out to be that stop string. The deltas of a choice always
add up to ``tokenizer.decode(tokens, skip_special_tokens=True)`` cut at the first stop string,
so a streamed answer is the same text as the whole one.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.text = ""  # everything decoded so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False  # a stop string was found: nothing more will come

    def push(self, token: int) -> str:
        """Adds one token; returns the text that became final (often empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        # Decoding the whole choice each time keeps deltas exact for every tokenizer (SentencePiece
        # spaces, byte fallback); it costs O(length) per token, small next to a swarm step.
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        self.text = text
        return self._take(self._final_length(text))

    def finish(self) -> str:
        """The rest of the text, at the end of the choice (a trailing U+FFFD stays as decode gives it)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        delta, self.sent = self.text[self.sent : end], end
        return delta

    def _first_stop(self, text: str) -> int | None:
        found = [index for stop in self.stop if (index := text.find(stop, self.sent)) >= 0]
        return min(found) if found else None

    def _final_length(self, text: str) -> int:
        """How much of ``text`` can no longer change, whatever the next tokens are."""
        end = len(text.rstrip(REPLACEMENT))
        held = 0  # the longest tail that is the start of some stop string
        for stop in self.stop:
            for size in range(min(len(stop) - 1, end - self.sent), held, -1):
                if text.endswith(stop[:size], 0, end):
                    held = size
                    break
        return end - held
