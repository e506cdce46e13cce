"""Detokenization: deltas join to decode() exactly (random tokens over tokenizers of every kind),
stop strings and partial characters are held back, and a push costs O(1) decode work."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from services.processor.text import TextStream
from tests.checkpoints import tiny_checkpoint


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


# ---- incremental detokenization: exact against decode(), O(1) work per token -------------------------

CORPUS = ["héllo wörld ✓ done", "中文字符 and naïve café 🙂 déjà vu", "don't stop. it's fine, isn't it? yes!",
          "we're here , they've gone ' quoted ' text ."] * 20


def _byte_level_bpe() -> PreTrainedTokenizerFast:
    """GPT-2/Qwen style: byte-level BPE whose merges include parts of multi-byte characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|end|>", "<|im|>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", additional_special_tokens=["<|im|>"])


PIECES = ["▁", "▁hello", "▁world", "é", "中", "文", "▁caf", "n't", "'", ".", ",", "s", "▁a", "b", "▁▁", "?", "🙂"]


def _sentencepiece(decoder: decoders.Decoder) -> PreTrainedTokenizerFast:
    """Llama/Gemma style: "▁" for spaces, <0xNN> byte fallback, the first token's leading space stripped."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    vocab |= {piece: len(vocab) + i for i, piece in enumerate(PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoder
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _wordpiece() -> PreTrainedTokenizerFast:
    """BERT style: "##" continuations, and transformers' clean_up_tokenization (" ." -> ".") on decode."""
    words = ["a", "b", "don", "it", "s", "m", "ve", "re", "n", "t", "'", ".", ",", "?", "!", "n't", "##s", "##'",
             "##t", "##n", "é", "##é", "中"]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[SEP]": 2} | {w: 3 + i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                                   clean_up_tokenization_spaces=True)


TOKENIZERS = {
    "byte-level-bpe": _byte_level_bpe,
    "byte-level-single-bytes": lambda: _single_bytes(),
    "sentencepiece-strip": lambda: _sentencepiece(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])),
    "sentencepiece-metaspace": lambda: _sentencepiece(decoders.Sequence([
        decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always")])),
    "wordpiece-cleanup": _wordpiece,
    "qwen2-vl-checkpoint": lambda: AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2_vl")),
}


def _single_bytes() -> PreTrainedTokenizerFast:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def any_tokenizer(request):
    return TOKENIZERS[request.param]()


def _random_ids(tokenizer, rng: random.Random, length: int) -> list[int]:
    """Random ids, biased toward the vocabulary's interesting parts: bytes, pieces, specials."""
    special = tokenizer.all_special_ids or [0]
    encoded = tokenizer.encode(rng.choice(CORPUS), add_special_tokens=False)
    pool = list(range(len(tokenizer)))
    return [rng.choice(special) if rng.random() < 0.05 else rng.choice(encoded) if rng.random() < 0.4
            else rng.choice(pool) for _ in range(length)]


def _stream_chunks(tokenizer, ids: list[int], stop: list[str], rng: random.Random) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas, i = [], 0
    while i < len(ids) and not stream.stopped:
        n = rng.choice([1, 1, 1, 2, 3])  # the LLM sends one token per message; the contract allows more
        deltas.append(stream.push(ids[i:i + n]))
        i += n
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_join_to_decode_exactly_on_random_tokens(any_tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        ids = _random_ids(any_tokenizer, rng, rng.randint(1, 40))
        deltas, stream = _stream_chunks(any_tokenizer, ids, [], rng)
        expected = any_tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(deltas) == stream.text == expected, ids


def test_stop_strings_on_random_tokens_cut_where_decode_has_them(any_tokenizer):
    rng = random.Random(1)
    for _ in range(200):
        ids = _random_ids(any_tokenizer, rng, rng.randint(1, 40))
        full = any_tokenizer.decode(ids, skip_special_tokens=True)
        if len(full) < 4:
            continue
        start = rng.randrange(len(full) - 2)
        stop = [full[start:start + rng.randint(1, 3)], "never-there"]
        deltas, stream = _stream_chunks(any_tokenizer, ids, stop, rng)
        first = min(i for i in (full.find(s) for s in stop) if i >= 0)
        assert stream.stopped
        assert "".join(deltas) == stream.text == full[:first], (ids, stop)


def test_no_partial_character_is_ever_emitted(any_tokenizer):
    rng = random.Random(2)
    for text in CORPUS[:4]:
        ids = any_tokenizer.encode(text, add_special_tokens=False)
        deltas, _ = _stream_chunks(any_tokenizer, ids, [], rng)
        assert not any("\ufffd" in d for d in deltas), deltas


class _CountingTokenizer:
    """Forwards to a tokenizer and records how many ids each decode() call was given."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.decoded_lengths: list[int] = []

    def decode(self, ids, **kwargs):
        self.decoded_lengths.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("stop", [[], ["NEVER SEEN STOP"]])
def test_work_per_token_is_constant_not_the_whole_output(tokenizer, stop):
    counting = _CountingTokenizer(tokenizer)
    ids = tokenizer.encode("héllo wörld ✓ 中文 done. " * 40)  # ~1000 single-byte tokens
    stream = TextStream(counting, stop)
    for token_id in ids:
        stream.push([token_id])
    per_token = counting.decoded_lengths[:]
    assert stream.text + stream.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    assert counting.decoded_lengths[-1] == len(ids)  # finish(): one whole decode, once
    assert max(per_token) <= 8, f"a push decoded {max(per_token)} tokens"  # a 4-byte character and its prefix
    assert sum(per_token) <= 8 * len(ids)


def test_stop_string_in_text_only_the_last_tokens_settle_is_found_at_finish():
    # A byte-fallback token may be the start of a longer run: its text waits until the run ends,
    # here at the end of generation. The stop string in it still ends the text (and the processor
    # reports FINISH_REASON_STOP).
    tokenizer = TOKENIZERS["sentencepiece-strip"]()
    ids = [tokenizer.convert_tokens_to_ids("▁hello"), tokenizer.convert_tokens_to_ids("<0x41>")]  # " A"
    stream = TextStream(tokenizer, ["A"])
    assert [stream.push([i]) for i in ids] == ["hello", ""]
    assert not stream.stopped
    assert stream.finish() == "" and stream.stopped and stream.text == "hello"
