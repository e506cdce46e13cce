"""Tiny random Gemma 4 checkpoints (Gemma4ForConditionalGeneration: a variable-resolution vision tower
pooled 3x3, and the Gemma 4 text model).

Gemma 4 resizes each image, keeping its aspect ratio, to at most `max_soft_tokens` x 3 x 3 patches
(70, 140, 280, ...; 16 px each in google/gemma-4-E2B-it), pads the patch list to that budget, and
pools the tower's output 3x3 into one soft token per 9 patches: the token count follows the image's
shape. The tiny one keeps that at 8 px patches and the smallest budget (70 soft tokens), and keeps
what makes the Gemma 4 text model different from a plain decoder: per-layer embeddings (a second
token table feeding every layer, `hidden_size_per_layer_input`), layers that reuse an earlier
layer's KV (`num_kv_shared_layers`), sliding and full layers, bidirectional attention within each
image (`use_bidirectional_attention="vision"`), (1 + w)-free RMS norms and final-logit softcapping.
Word embeddings are tied to lm_head.
"""

from __future__ import annotations

import math

import torch

from services.tiny_checkpoints import common

FAMILY = "gemma4"

# Gemma 4's special tokens; here their ids follow the BPE vocabulary in this order.
GEMMA4_SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
)  # fmt: skip

# A Gemma-style chat template: turns between <start_of_turn>/<end_of_turn>, "model" for the
# assistant, one <|image|> per image (the processor expands it to <|image> + N x <|image|> + <image|>).
GEMMA4_CHAT_TEMPLATE = """{{ bos_token }}
{%- for message in messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<|image|>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

_SPECIAL_ROW_SCALE = 0.3  # see gemma3's

# The shared text and tower shapes, plus: text head_dim, sliding window, per-layer input width, the
# layers that share KV, tower head_dim and patch, and the soft-token budget per image.
_GEMMA4_SIZES = common.sizes(
    tiny=dict(layers=4, head_dim=16, sliding_window=16, per_layer=8, kv_shared=2, vision_head_dim=16, patch=8,
              max_soft_tokens=70),
    bench=dict(layers=6, head_dim=64, sliding_window=128, per_layer=32, kv_shared=2, vision_head_dim=64, patch=16,
               max_soft_tokens=70),
)


def _gemma4_std(name: str, param: torch.Tensor) -> float | None:
    """Per-parameter std, so that outputs depend on the prompt and the image: Gemma 4's RMS norms
    multiply by w (init 1) and keep it; token tables at 1/sqrt(width) (scaled back up by sqrt(width));
    linear layers at ~1/sqrt(fan_in); the vision position table at 0.5 so patches differ."""
    if param.ndim == 1:
        if "norm" in name or name.endswith("layer_scalar"):
            return None  # keep the init (ones)
        return 0.02 if name.endswith("bias") else None
    if name.endswith(("embed_tokens.weight", "embed_tokens_per_layer.weight")):
        return 1.0 / math.sqrt(param.shape[1])
    if "position_embedding" in name:
        return 0.5
    return common.variance_preserving_std(param)


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    p = _GEMMA4_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        GEMMA4_SPECIAL_TOKENS,
        bos="<bos>",
        pad="<pad>",
        stop=("<eos>", "<end_of_turn>"),
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                              "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"},
        model_max_length=32768,
    )
    vocab_size = common.padded_vocab_size(vocab.tokenizer)
    config = Gemma4Config(
        text_config=common.text_config(
            p,
            vocab,
            head_dim=p["head_dim"],
            global_head_dim=p["head_dim"],
            sliding_window=p["sliding_window"],
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p["layers"])],
            hidden_size_per_layer_input=p["per_layer"],
            vocab_size_per_layer_input=vocab_size,
            num_kv_shared_layers=p["kv_shared"],
            use_bidirectional_attention="vision",
            final_logit_softcapping=30.0,
            max_position_embeddings=32768,
        ),
        vision_config=dict(
            hidden_size=p["vision_hidden"], intermediate_size=p["vision_intermediate"],
            num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
            num_key_value_heads=p["vision_heads"], head_dim=p["vision_head_dim"], patch_size=p["patch"],
            position_embedding_size=1024,
        ),
        boi_token_id=vocab.ids["<|image>"],
        eoi_token_id=vocab.ids["<image|>"],
        image_token_id=vocab.ids["<|image|>"],
        video_token_id=vocab.ids["<|video|>"],
        boa_token_id=vocab.ids["<|audio>"],
        eoa_token_index=vocab.ids["<audio|>"],
        audio_token_id=vocab.ids["<|audio|>"],
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = common.random_model(Gemma4ForConditionalGeneration, config, ctx.seed, _gemma4_std)
    common.quiet_tied_rows(model.model.language_model.embed_tokens.weight, vocab, _SPECIAL_ROW_SCALE)

    image_processor = Gemma4ImageProcessor(patch_size=p["patch"], max_soft_tokens=p["max_soft_tokens"])
    video_processor = Gemma4VideoProcessor(patch_size=p["patch"], max_soft_tokens=p["max_soft_tokens"])
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        video_processor=video_processor,
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=p["max_soft_tokens"],
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
