"""Incremental detokenization with stop strings, so streamed deltas join to the final text.

Three layers, each holding back what the next tokens could still change:

1. Tokens -> raw text, as vLLM's detokenizer does: only a window of the last tokens is decoded.
   `prefix_offset:read_offset` are the tokens whose text was emitted last; decoding them together
   with the new tokens and removing their own text gives the new text with the spaces the
   tokenizer's decoder would put between them (SentencePiece strips the leading space of the
   first token of a decode: both decodes start with the same token, so the strip cancels).
   A window whose text ends in U+FFFD may end inside a multi-byte character and waits; so does
   one that ends in a byte-fallback token (<0xNN>, SentencePiece): the decoder turns a whole run of
   them into text or, if the run is not valid UTF-8, into one U+FFFD per byte.
2. Raw -> cleaned text, only for tokenizers whose decode() runs transformers'
   `clean_up_tokenization` (it drops the space in " .", " n't", ...): text that could be the start
   of such a pattern waits for the next characters.
3. Cleaned -> emitted text: text that could still be the start of a stop string waits; the text
   before the first stop string is all that is ever emitted.

Each push decodes O(window) tokens and searches O(longest stop string) characters: linear in the
output overall, where re-decoding everything every token was quadratic. `finish()` decodes the
whole output once, so the final text is `tokenizer.decode(ids, skip_special_tokens=True)`.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# What transformers' clean_up_tokenization replaces; each drops its leading space.
_CLEANUP_PATTERNS = (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're")
_CLEANUP_PREFIXES = frozenset(p[:k] for p in _CLEANUP_PATTERNS for k in range(1, len(p)))
_MAX_CLEANUP_PREFIX = max(len(p) for p in _CLEANUP_PREFIXES)


def _cleans_up_spaces(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether tokenizer.decode() runs clean_up_tokenization by default (transformers 5 never does
    for a BPE model unless forced, whatever clean_up_tokenization_spaces says)."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        return bool(getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                            False))
    return True


@lru_cache(maxsize=8)
def _vocabulary_facts(tokenizer: PreTrainedTokenizerBase) -> tuple[frozenset[int], frozenset[int]]:
    """(byte-fallback token ids, special token ids) of a tokenizer; looked up once per tokenizer."""
    names = [f"<0x{b:02X}>" for b in range(256)]
    ids = tokenizer.convert_tokens_to_ids(names)
    byte_ids = frozenset(i for i, name in zip(ids, names, strict=True)
                         if i is not None and tokenizer.convert_ids_to_tokens(i) == name)
    return byte_ids, frozenset(tokenizer.all_special_ids)


class TextStream:
    """Turns generated token ids into text deltas; stops at the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.stopped = False
        self.token_ids: list[int] = []
        # Layer 1: tokens -> raw text.
        self._prefix_offset = 0
        self._read_offset = 0
        self._prefix_text = ""  # decode(token_ids[prefix_offset:read_offset])
        self._byte_ids, self._special_ids = _vocabulary_facts(tokenizer)
        # Layer 2: raw -> cleaned text.
        self._cleans = _cleans_up_spaces(tokenizer)
        self._raw_pending = ""  # raw text not cleaned yet
        # Layer 3: cleaned -> emitted text. Held back: the last _hold characters, as a stop string
        # may start there. A stop string cannot start in emitted text: it would have to span all
        # the held characters and at least one more on each side, _hold + 2 > the longest.
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._pending = ""  # cleaned text not emitted yet
        self._chunks: list[str] = []  # what was emitted

    @property
    def text(self) -> str:
        """The text emitted so far."""
        return "".join(self._chunks)

    def push(self, token_ids: list[int]) -> str:
        """Adds tokens and returns the text that is now certain."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        return self._release(self._clean(self._decode_new()), final=False)

    def finish(self) -> str:
        """The rest of the text once generation has ended."""
        if self.stopped:
            return ""
        # One whole decode at the end: the final text is decode()'s by construction.
        full = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        certain = self.text + self._pending  # all that layer 3 has been given
        if not full.startswith(certain):
            log.error("incremental detokenization diverged from decode(): %r is not a prefix of %r", certain, full)
            return self._release("", final=True)
        return self._release(full[len(certain):], final=True)

    # ---- layer 1: tokens -> raw text ----------------------------------------------------
    def _decode_new(self) -> str:
        """Raw text of the tokens after read_offset, once it is certain ("" while it is not)."""
        last = next((t for t in reversed(self.token_ids) if t not in self._special_ids), None)
        if last in self._byte_ids:
            return ""  # a byte-fallback run may go on (skipped special tokens do not end it)
        new_text = self._decode(self.token_ids[self._prefix_offset:])
        if (len(new_text) <= len(self._prefix_text) or new_text.endswith("\ufffd")
                or not new_text.startswith(self._prefix_text)):
            return ""  # nothing new yet, an unfinished character, or a decoder that wants more context
        delta = new_text[len(self._prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self.token_ids)
        self._prefix_text = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ---- layer 2: raw -> cleaned text ---------------------------------------------------
    def _clean(self, raw: str) -> str:
        """Cleans the raw text up to a cut that no pattern spans: chunk by chunk equals all at once."""
        if not self._cleans:
            return raw
        pending = self._raw_pending + raw
        cut = len(pending)
        # Back off while the text before the cut ends like the start of a pattern (" n", " '", ...).
        while k := next((k for k in range(1, _MAX_CLEANUP_PREFIX + 1)
                         if cut - k >= 0 and pending[cut - k:cut] in _CLEANUP_PREFIXES), 0):
            cut -= k
        self._raw_pending = pending[cut:]
        return self.tokenizer.clean_up_tokenization(pending[:cut])

    # ---- layer 3: cleaned -> emitted text -----------------------------------------------
    def _release(self, new: str, final: bool) -> str:
        """Emits what no stop string can claim any more; stops at the first stop string."""
        window = self._pending + new
        hits = [i for i in (window.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(window) if final else max(0, len(window) - self._hold)
        self._pending = "" if self.stopped else window[end:]
        if end:
            self._chunks.append(window[:end])
        return window[:end]
