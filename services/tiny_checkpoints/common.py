"""What every tiny-checkpoint builder shares: the build context and size presets, a seeded BPE
tokenizer with its special ids, the config keys every family sets alike, seeded weight re-draws,
the per-parameter std recipe, the lm_head row shaping and saving."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

SIZES = ("tiny", "bench")

# Scales the EOS rows of lm_head: EOS stays reachable (stop handling needs it) but a little rarer.
# Seen on tiny seeds 0/1 (random text prompts): at 1.0, 1 prompt in 8 stops within 16 greedy tokens;
# at 0.9, ~1% within 8 tokens and 7-17% within 128.
EOS_LOGIT_SCALE = 0.9


@dataclass(frozen=True)
class BuildContext:
    """What a family builder gets: where to write, the seed, and the size preset."""

    out_dir: Path
    seed: int
    size: str


# The language model (`text_config`) and vision tower (`vision_tower_config`) shapes most builders
# share, per size: text hidden, layers, heads, kv heads, intermediate; tower width, layers, heads,
# intermediate. A builder's own keys go on top (`sizes`).
TEXT_SIZES: dict[str, dict] = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "bench": dict(hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024),
}
TOWER_SIZES: dict[str, dict] = {
    "tiny": dict(vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64),
    "bench": dict(vision_hidden=256, vision_layers=6, vision_heads=4, vision_intermediate=1024),
}
assert set(TEXT_SIZES) == set(TOWER_SIZES) == set(SIZES)


def sizes(
    tiny: dict, bench: dict, shared: tuple[dict[str, dict], ...] = (TEXT_SIZES, TOWER_SIZES)
) -> dict[str, dict]:
    """A builder's size presets: the `shared` shapes, then the family's own keys (which may replace
    shared ones)."""
    presets: dict[str, dict] = {}
    for size, own in (("tiny", tiny), ("bench", bench)):
        presets[size] = {}
        for table in shared:
            presets[size].update(table[size])
        presets[size].update(own)
    return presets


# ---------------------------------------------------------------------------------------------
# Tokenizer (shared by all families)
# ---------------------------------------------------------------------------------------------

# Ordinary English so that common words get their own merges, like in a real vocabulary.
_ENGLISH = """\
You are a helpful assistant. Describe this image in detail. What is shown in the picture?
The quick brown fox jumps over the lazy dog. A red square sits next to a blue circle.
Please answer the question about the video. How many people are in the photo?
There is a cat on the table and a dog under the chair. The sky is clear and the sun is bright.
Write a short story about a robot who learns to paint. Summarize the text in one sentence.
Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 and symbols like , . ; : ! ? ( ) [ ] { } - + = / * appear.
The user asked the assistant to explain the difference between a model and a processor.
"""

_SYLLABLES = ("ka", "to", "ri", "ne", "mu", "sa", "lo", "vi", "de", "pa", "zu", "qi", "bo", "fe",
              "gra", "str", "th", "sh", "ch", "an", "en", "in", "on", "un", "er", "or", "ar", "y", "x")


def _random_words(rng: random.Random, count: int) -> list[str]:
    """`count` distinct pseudo-words: enough variety for BPE to fill a ~1000-token vocabulary."""
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)  # sorted: set order is not deterministic across processes


def _corpus(seed: int) -> list[str]:
    """Training lines derived only from the seed: random-word sentences plus English text."""
    rng = random.Random(seed)
    words = _random_words(rng, 3000)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(2000)]
    # Capitalised and punctuated variants so that " Word" and "word," also get merges.
    lines += [w.capitalize() + rng.choice([".", ",", "!", "?", ":"]) for w in words[:500]]
    lines += _ENGLISH.splitlines() * 20
    return lines


def train_bpe_tokenizer(
    seed: int,
    special_tokens: Iterable[str],
    vocab_size: int = 1000,
    **tokenizer_kwargs: object,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the seed's corpus, with `special_tokens` appended after it.

    Special tokens get the ids right after the learned vocabulary (as in Qwen's tokenizer), in the
    given order. `tokenizer_kwargs` names roles, e.g. eos_token="<|im_end|>".
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte sequence stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokenizer_kwargs)


@dataclass(frozen=True)
class Vocab:
    """A builder's tokenizer with the special ids that its model and generation configs name."""

    tokenizer: PreTrainedTokenizerFast
    ids: dict[str, int]  # every special token's id, by token
    bos_id: int
    pad_id: int
    stop_ids: list[int]  # generation stops at any of these; the first is the text config's eos_token_id


def train_vocab(
    seed: int,
    special_tokens: tuple[str, ...],
    *,
    bos: str,
    pad: str,
    stop: Sequence[str],
    **tokenizer_kwargs: object,
) -> Vocab:
    """`train_bpe_tokenizer` with the ids of `special_tokens` and the roles the configs give them.

    The tokenizer takes the same roles (bos_token, pad_token, and eos_token: the first stop token)
    unless `tokenizer_kwargs` say otherwise; None leaves a role unset (Qwen's tokenizer has no bos
    token, yet its configs name <|endoftext|>).
    """
    roles = {"bos_token": bos, "pad_token": pad, "eos_token": stop[0]} | tokenizer_kwargs
    tokenizer = train_bpe_tokenizer(seed, special_tokens, **{k: v for k, v in roles.items() if v is not None})
    ids = special_token_ids(tokenizer, special_tokens)
    return Vocab(tokenizer, ids, bos_id=ids[bos], pad_id=ids[pad], stop_ids=[ids[t] for t in stop])


def special_token_ids(tokenizer: PreTrainedTokenizerFast, tokens: Iterable[str]) -> dict[str, int]:
    """Each special token's id, by token: builders wire these into configs and lm_head rows."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def padded_vocab_size(tokenizer: PreTrainedTokenizerFast, multiple: int = 64) -> int:
    """The model's vocab: the tokenizer's rounded up, as real checkpoints pad theirs."""
    return math.ceil(len(tokenizer) / multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Configs (shared)
# ---------------------------------------------------------------------------------------------


def text_config(p: Mapping[str, object], vocab: Vocab, **family_keys: object) -> dict[str, object]:
    """The language model's config keys that every builder sets alike: the TEXT_SIZES shape of
    preset `p`, the padded vocabulary, the special ids and float32; `family_keys` add to or replace
    them (model_type, rope, head_dim, ...)."""
    return {
        "vocab_size": padded_vocab_size(vocab.tokenizer),
        "hidden_size": p["hidden"],
        "intermediate_size": p["intermediate"],
        "num_hidden_layers": p["layers"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "bos_token_id": vocab.bos_id,
        "eos_token_id": vocab.stop_ids[0],
        "pad_token_id": vocab.pad_id,
        "initializer_range": 0.1,  # informative only: weights are re-drawn
        "dtype": "float32",
        **family_keys,
    }


def vision_tower_config(p: Mapping[str, object], **family_keys: object) -> dict[str, object]:
    """A vision tower's config with the TOWER_SIZES shape of preset `p`, plus `family_keys`."""
    return {
        "hidden_size": p["vision_hidden"],
        "intermediate_size": p["vision_intermediate"],
        "num_hidden_layers": p["vision_layers"],
        "num_attention_heads": p["vision_heads"],
        **family_keys,
    }


# ---------------------------------------------------------------------------------------------
# Weights (shared)
# ---------------------------------------------------------------------------------------------


# Maps a parameter's name and tensor to the std to draw it from, or None for its kind of default.
StdFor = Callable[[str, torch.Tensor], float | None]

# A rule's key: a name suffix, or a tuple of suffixes any of which matches (as str.endswith takes).
Suffixes = str | tuple[str, ...]


def redraw_weights(model: PreTrainedModel, seed: int, std_for: StdFor) -> None:
    """Re-draw every parameter from N(0, std_for(name, param)) with a generator seeded by `seed`.

    `std_for` returning None keeps a parameter's kind of default: ones for norm weights, zeros for
    biases. Drawing from one explicit generator in named_parameters order makes the weights a pure
    function of the seed, whatever the global RNG state is.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            std = std_for(name, param)
            if std is None:
                param.fill_(1.0 if param.ndim == 1 and not name.endswith("bias") else 0.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def random_model(model_class: type[PreTrainedModel], config: PretrainedConfig, seed: int,
                 std_for: StdFor) -> PreTrainedModel:
    """`model_class(config)` in eval mode, every parameter re-drawn (`redraw_weights`)."""
    model = model_class(config).eval()
    redraw_weights(model, seed, std_for)
    return model


def fan_in(param: torch.Tensor) -> int:
    """Inputs per output unit: in_features for Linear, C*kT*kH*kW for Conv3d, 1 for vectors."""
    return math.prod(param.shape[1:]) if param.ndim > 1 else 1


def variance_preserving_std(param: torch.Tensor) -> float:
    """1/sqrt(fan_in), instead of the stock 0.02, so that layers really transform the residual
    stream rather than passing the embedding through."""
    return 1.0 / math.sqrt(fan_in(param))


def vector_std(name: str) -> float | None:
    """Norm weights keep ones (None); biases get a little noise so that they break symmetry."""
    return 0.02 if name.endswith("bias") else None


def lm_head_std(hidden: int) -> float:
    """lm_head std for logits of std ~3 on a normed hidden state: large enough that greedy picks
    depend on the hidden state."""
    return 3.0 / math.sqrt(hidden)


def scaled_std(
    hidden: int,
    *,
    fixed: Mapping[Suffixes, float] | None = None,
    gains: Mapping[Suffixes, float] | None = None,
    embed_std: float = 1.0,
) -> StdFor:
    """The per-parameter std that most builders use (first tuned for Qwen2-VL), so that greedy
    outputs depend on the prompt and the image. Checked in this order, first match wins:

    - `fixed`: absolute stds by name suffix, vectors included (learned CLS tokens, position tables);
    - other vectors: `vector_std`;
    - token embeddings (`embed_tokens.weight`) at `embed_std`, lm_head at `lm_head_std(hidden)`;
    - `gains`: multiples of the variance-preserving std by name suffix (q/k for peaked attention,
      a projector's output at the token embeddings' scale); every other matrix at 1x.

    Each family passes its own tables, with the reasons, from its module.
    """
    fixed_rules = list((fixed or {}).items())
    gain_rules = list((gains or {}).items())

    def std_for(name: str, param: torch.Tensor) -> float | None:
        for suffixes, std in fixed_rules:
            if name.endswith(suffixes):
                return std
        if param.ndim == 1:
            return vector_std(name)
        if name.endswith("embed_tokens.weight"):
            return embed_std
        if name == "lm_head.weight":
            return lm_head_std(hidden)
        base = variance_preserving_std(param)
        for suffixes, gain in gain_rules:
            if name.endswith(suffixes):
                return gain * base
        return base

    return std_for


# ---------------------------------------------------------------------------------------------
# Output rows (shared)
# ---------------------------------------------------------------------------------------------


def _non_stop(special_ids: Iterable[int], stop_ids: Collection[int]) -> list[int]:
    return [i for i in special_ids if i not in stop_ids]


def silence_lm_head_rows(lm_head: torch.Tensor, vocab: Vocab, eos_scale: float = EOS_LOGIT_SCALE) -> None:
    """For an untied lm_head: zero the rows the model should never emit, scale the stop rows.

    Never: vocab padding beyond the tokenizer and the special tokens other than the stop ones
    (placeholders belong to the processor; a generated image token would confuse a serving engine).
    A zero row scores 0 while real rows spread around it, so greedy never picks one in practice.
    The stop tokens stay reachable (stop handling needs them); `eos_scale` < 1 makes short greedy
    runs rarely cut off.
    """
    with torch.no_grad():
        never = [*range(len(vocab.tokenizer), lm_head.shape[0])] + _non_stop(vocab.ids.values(), vocab.stop_ids)
        lm_head[never] = 0.0
        lm_head[vocab.stop_ids] *= eos_scale


def quiet_tied_rows(embedding: torch.Tensor, vocab: Vocab, special_scale: float,
                    eos_scale: float = EOS_LOGIT_SCALE) -> None:
    """For token embeddings tied to lm_head: as `silence_lm_head_rows`, but the special rows other
    than the stop ones are scaled by `special_scale` instead of zeroed, because they are also the
    input embeddings of turn tokens and must keep a direction. Padding rows are never input nor
    output."""
    with torch.no_grad():
        embedding[len(vocab.tokenizer):] = 0.0
        embedding[_non_stop(vocab.ids.values(), vocab.stop_ids)] *= special_scale
        embedding[vocab.stop_ids] *= eos_scale


# ---------------------------------------------------------------------------------------------
# Saving (shared)
# ---------------------------------------------------------------------------------------------


def save_generation_config(out_dir: Path, eos_token_ids: list[int], pad_token_id: int, bos_token_id: int) -> None:
    # No do_sample/temperature/top_k/top_p: greedy is the default and nothing warns about it.
    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_ids, pad_token_id=pad_token_id).save_pretrained(
        out_dir
    )


def save_checkpoint(out_dir: Path, model: PreTrainedModel, processor: ProcessorMixin, vocab: Vocab) -> None:
    """Write model, generation config and processor (with its tokenizer and chat template).

    The generation config comes after the model: model.save_pretrained may write one derived from
    the model config, and ours must replace it.
    """
    model.save_pretrained(out_dir)
    save_generation_config(out_dir, eos_token_ids=vocab.stop_ids, pad_token_id=vocab.pad_id, bos_token_id=vocab.bos_id)
    processor.save_pretrained(out_dir)
