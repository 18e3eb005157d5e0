"""Streaming text per row: incremental detokenization and stop sequences.

Byte-level tokens can end in the middle of a UTF-8 character, so text is released only
once it decodes cleanly. Text that could be the start of a stop sequence is held back
until it is clear either way, so a stop string never reaches the client.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all decoded text so far
        self.sent = 0  # chars of self.text already released
        self._prefix_offset = 0  # ids[_prefix_offset:_read_offset] decode to the tail already in text
        self._read_offset = 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a generated token. Returns (text to release now, stop sequence hit)."""
        self.ids.append(token_id)
        self._decode_new()
        if self.stop:
            hit = self._find_stop()
            if hit is not None:
                delta = self.text[self.sent : hit]
                self.text = self.text[:hit]
                self.sent = hit
                return delta, True
            end = len(self.text) - self._holdback()
        else:
            end = len(self.text)
        delta = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return delta, False

    def flush(self) -> str:
        """At the end of generation: release whatever was held back, an incomplete
        character included (as U+FFFD)."""
        self._decode_new(final=True)
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _decode_new(self, final: bool = False) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        after = decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        # A UTF-8 character is at most 4 bytes: past that, the bytes are invalid, not pending.
        pending = after.endswith("\ufffd") and len(self.ids) - self._read_offset < 4
        if len(after) > len(before) and (final or not pending):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)

    def _find_stop(self) -> int | None:
        longest = max(len(s) for s in self.stop)
        start = max(0, self.sent - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _holdback(self) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
