from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from services.processor.text import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    # A byte-level tokenizer whose tokens are single bytes: multi-byte characters span tokens.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _stream(tokenizer, text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token_id in tokenizer.encode(text):
        deltas.append(stream.push([token_id]))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_join_to_text_with_multibyte_characters(tokenizer):
    deltas, stream = _stream(tokenizer, "héllo wörld ✓ done", [])
    assert "".join(deltas) == stream.text == "héllo wörld ✓ done"
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_ends_text_before_it(tokenizer):
    deltas, stream = _stream(tokenizer, "one two STOP three", ["STOP"])
    assert stream.stopped
    assert "".join(deltas) == stream.text == "one two "


def test_partial_stop_string_is_held_back_then_released(tokenizer):
    deltas, stream = _stream(tokenizer, "a STAR b", ["STOP"])
    assert not stream.stopped
    assert "".join(deltas) == "a STAR b"
    assert "ST" not in "".join(deltas[:4])  # "a ST" could still become "a STOP"


def test_earliest_of_several_stop_strings(tokenizer):
    _, stream = _stream(tokenizer, "xx END yy HALT", ["HALT", "END"])
    assert stream.text == "xx "
