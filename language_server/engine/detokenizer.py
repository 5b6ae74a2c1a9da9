"""Incremental detokenization of one request's output with stop-string detection.

Text is released only when it is stable (no dangling partial UTF-8 character) and cannot be the
start of a stop string; a stop string ends the text before it — one that ends within the first
`min_tokens` tokens does not (vLLM's min_tokens). The engine owns one per request.
"""

from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), min_tokens: int = 0) -> None:
        self.tokenizer, self.min_tokens = tokenizer, min_tokens
        self.checked = 0  # text before this cannot hold the start of a stop string that counts
        self.stop = tuple(s for s in stop if s)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already handed out
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> tuple[str, bool]:
        """-> (newly releasable text, hit a stop string)."""
        self.ids.append(token)
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self._prefix : self._read], skip_special_tokens=True)
        full = dec(self.ids[self._prefix :], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop and len(self.ids) < self.min_tokens:
            self.checked = max(0, len(self.text) - self.hold)  # a stop string may still end later
        elif self.stop:
            start = max(self.checked, self.sent - self.hold, 0)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[: min(hits)]
                return self._release(len(self.text)), True
        return self._release(len(self.text) - self.hold), False

    def flush(self) -> str:
        """The request ended: release everything still held back."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : upto], upto
        return out
