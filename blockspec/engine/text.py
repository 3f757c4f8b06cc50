"""Incremental detokenization with stop strings, for streaming.

Text is released as tokens are committed, except (a) bytes of an unfinished multi-byte character and
(b) a tail that could still turn out to be the start of a stop string; the stop string itself is never
emitted (OpenAI semantics).
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer: object, stop_strings: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.holdback = max((len(s) for s in self.stop_strings), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far (stop string removed once found)
        self.emitted = 0  # characters of `text` already released
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> bool:
        """Add one committed token; returns True once a stop string has appeared (later tokens are ignored)."""
        if self.stopped:
            return True
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            searched_from = max(0, len(self.text) - self.holdback)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            hits = [i for i in (self.text.find(s, searched_from) for s in self.stop_strings) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
        return self.stopped

    def release(self, final: bool = False) -> str:
        """Text safe to show now (everything, once `final` or stopped)."""
        end = len(self.text) if (final or self.stopped) else max(self.emitted, len(self.text) - self.holdback)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
