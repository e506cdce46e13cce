"""Tiny random Qwen2-Audio checkpoints (Qwen2AudioForConditionalGeneration).

A Whisper-style audio encoder (two convolutions, transformer layers, a 2x average pool) over 128-bin
log-mel features that the WhisperFeatureExtractor always pads to 30 s (3000 frames), a linear
projector into a Qwen2 language model. The encoder's position table must cover those 3000 frames
after the stride-2 convolution (max_source_positions 1500, as the real model): the tower is made
small in width and depth only.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen2_vl import qwen_vocab

FAMILY = "qwen2_audio"

# Qwen2-Audio's special tokens, in the order of the real tokenizer (ids follow the BPE vocabulary).
QWEN2_AUDIO_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>",
                              "<|audio_eos|>")

# The chat template transformers' Qwen2AudioProcessor documents (its default_chat_template): ChatML with a
# default system prompt, "Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>" per clip (the processor expands
# <|AUDIO|> to the clip's token count). It recognises a clip by its part's type or its audio key.
QWEN2_AUDIO_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content or content['type'] == 'audio' %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The shared text shape (common.TEXT_SIZES) plus the audio encoder's width, layers, heads and MLP.
_QWEN2_AUDIO_SIZES = common.sizes(
    tiny=dict(audio_d_model=32, audio_layers=2, audio_heads=2, audio_ffn=64),
    bench=dict(audio_d_model=256, audio_layers=4, audio_heads=4, audio_ffn=1024),
    shared=(common.TEXT_SIZES,),
)
_MEL_BINS = 128  # Qwen2-Audio's feature extractor (Whisper large-v3's)
_MAX_SOURCE_POSITIONS = 1500  # 30 s of 10 ms frames after the stride-2 convolution
_MAX_POSITIONS = 8192


def _qwen2_audio_std(hidden: int) -> common.StdFor:
    """Per-parameter std, chosen so that outputs depend on the prompt and the clip (as Qwen2-VL's,
    see qwen2_vl.qwen2_vl_std): token embeddings at 1, matrices variance-preserving, q/k twice that
    for peaked attention, the projector's output at twice the token embeddings' scale so the audio
    rows are not drowned out, lm_head for logits of std ~3. The encoder's learned position table at
    0.5 (the real one is sinusoidal, of that order) so frames differ by place."""
    return common.scaled_std(
        hidden,
        fixed={"embed_positions.weight": 0.5},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.linear.weight": 2.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    p = _QWEN2_AUDIO_SIZES[ctx.size]
    vocab = qwen_vocab(ctx.seed, QWEN2_AUDIO_SPECIAL_TOKENS, model_max_length=_MAX_POSITIONS)
    config = Qwen2AudioConfig(
        text_config=common.text_config(
            p, vocab, model_type="qwen2", max_position_embeddings=_MAX_POSITIONS, max_window_layers=p["layers"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False),
        audio_config=dict(
            model_type="qwen2_audio_encoder",
            d_model=p["audio_d_model"],
            encoder_layers=p["audio_layers"],
            encoder_attention_heads=p["audio_heads"],
            encoder_ffn_dim=p["audio_ffn"],
            num_mel_bins=_MEL_BINS,
            max_source_positions=_MAX_SOURCE_POSITIONS,
        ),
        audio_token_index=vocab.ids["<|AUDIO|>"],
        tie_word_embeddings=False,
    )
    model = common.random_model(Qwen2AudioForConditionalGeneration, config, ctx.seed, _qwen2_audio_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)
    processor = Qwen2AudioProcessor(feature_extractor=WhisperFeatureExtractor(feature_size=_MEL_BINS),
                                    tokenizer=vocab.tokenizer, chat_template=QWEN2_AUDIO_CHAT_TEMPLATE)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
