"""Incremental detokenization with stop strings: turns a stream of token ids into text deltas, never
splitting a multi-byte character and holding back text that could be the start of a stop string."""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str] | None = None, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all text decoded so far (stable part)
        self.sent = 0  # characters of self.text already emitted
        self.stopped = False

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        """Add one token; returns the text that may be emitted now (possibly ''). After a stop string
        is found ``stopped`` is True and the text is cut right before it."""
        if self.stopped:
            return ""
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: everything not yet emitted (held-back partial stops included)."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):  # a trailing incomplete character: emit what decodes
            full = self._decode(self.ids[self.prefix_offset :])
            prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
            if len(full) > len(prefix):
                self.text += full[len(prefix) :].rstrip("\ufffd")
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.sent - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.text = self.text[:cut]
                self.stopped = True
                out = self.text[self.sent :]
                self.sent = len(self.text)
                return out
            if not final:
                hold = 0
                for s in self.stop:
                    for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1):
                        if self.text.endswith(s[:k]):
                            hold = max(hold, k)
                            break
                end = len(self.text) - hold
                out = self.text[self.sent : end]
                self.sent = max(self.sent, end)
                return out
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
