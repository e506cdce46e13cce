"""Incremental detokenization with stop strings, so streamed deltas join to the final text."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    """Turns generated token ids into text deltas; stops at the first stop string.

    Text that could still become a stop string, or ends in an incomplete UTF-8
    character, is held back until the next tokens decide it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.token_ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def _decoded(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token_ids: list[int]) -> str:
        """Adds tokens and returns the text that is now certain."""
        self.token_ids.extend(token_ids)
        full = self._decoded()
        search_from = max(0, len(self.text) - self._hold)
        hits = [i for i in (full.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._emit(full[: min(hits)])
        safe = full.rstrip("\ufffd")  # an incomplete character waits for its remaining bytes
        return self._emit(safe[: len(safe) - self._hold] if self._hold else safe)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        return self._emit(self._decoded())

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""
        delta = upto[len(self.text):]
        self.text = upto
        return delta
