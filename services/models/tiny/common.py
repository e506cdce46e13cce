"""What every tiny-checkpoint builder shares: the build context, a seeded BPE tokenizer,
seeded weight re-draws and the generation config."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

SIZES = ("tiny", "bench")


@dataclass(frozen=True)
class BuildContext:
    """What a family builder gets: where to write, the seed, and the size preset."""

    out_dir: Path
    seed: int
    size: str


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


def padded_vocab_size(tokenizer: PreTrainedTokenizerFast, multiple: int = 64) -> int:
    """The model's vocab: the tokenizer's rounded up, as real checkpoints pad theirs."""
    return math.ceil(len(tokenizer) / multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Weights (shared)
# ---------------------------------------------------------------------------------------------


def redraw_weights(model: PreTrainedModel, seed: int, std_for: Callable[[str, torch.Tensor], float | None]) -> None:
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


def fan_in(param: torch.Tensor) -> int:
    """Inputs per output unit: in_features for Linear, C*kT*kH*kW for Conv3d, 1 for vectors."""
    return math.prod(param.shape[1:]) if param.ndim > 1 else 1


def save_generation_config(out_dir: Path, eos_token_ids: list[int], pad_token_id: int, bos_token_id: int) -> None:
    # No do_sample/temperature/top_k/top_p: greedy is the default and nothing warns about it.
    GenerationConfig(bos_token_id=bos_token_id, eos_token_id=eos_token_ids, pad_token_id=pad_token_id).save_pretrained(
        out_dir
    )
