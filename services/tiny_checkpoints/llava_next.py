"""Tiny random LLaVA-NeXT checkpoints (LlavaNextForConditionalGeneration: CLIP tower + Mistral),
shaped like llava-hf/llava-v1.6-mistral-7b-hf.

"anyres": an image is resized into the best of `image_grid_pinpoints` (real: 336x672, 672x336,
672x672, 1008x336, 336x1008, i.e. 1x2 .. 3x1 tiles of 336 px), cut into tiles, and a base view of
the whole image is added in front. The tiny tower keeps patch 14 on 56 px tiles (4x4 = 16 tokens
per tile) and the same pinpoints scaled by 56/336, so the token count still depends on the image's
aspect ratio the way the real one does (unpadding, one image_newline row end per row).
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.llava import llava_config_kwargs, llava_processor_kwargs, llava_std, llava_vocab

FAMILY = "llava_next"

# The chat template of llava-hf/llava-v1.6-mistral-7b-hf: "[INST] " + one "<image>\n" per image (all
# images first) + the text parts + " [/INST]"; the model answers right after (no generation prompt).
# The Llama tokenizer adds <s> in front.
LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}"
    "{% endfor %}"
)

# The shared text (Mistral) and tower (CLIP) shapes (common.sizes) with one tower layer more, as
# LLaVA-1.5's, plus the tile size; patch stays 14.
_LLAVA_NEXT_SIZES = common.sizes(
    tiny=dict(vision_layers=3, image_size=56),
    bench=dict(vision_layers=7, image_size=224),
)

# llava-v1.6's pinpoints in tiles (height, width): 1x2, 2x1, 2x2, 3x1, 1x3.
_GRID_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    p = _LLAVA_NEXT_SIZES[ctx.size]
    tile = p["image_size"]
    pinpoints = [[h * tile, w * tile] for h, w in _GRID_TILES]
    vocab = llava_vocab(ctx.seed)
    kwargs = llava_config_kwargs(p, vocab, "mistral")
    # Mistral-7B-Instruct-v0.2 under llava-v1.6: full attention (no sliding window), rope theta 1e6.
    kwargs["text_config"].update(sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    config = LlavaNextConfig(**kwargs, image_grid_pinpoints=pinpoints)
    model = common.random_model(LlavaNextForConditionalGeneration, config, ctx.seed, llava_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    image_processor = LlavaNextImageProcessor(  # llava-hf: shortest_edge 336, crop 336x336, bicubic, CLIP mean/std
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        do_center_crop=True,
        do_convert_rgb=True,
        do_pad=True,
        resample=3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        **llava_processor_kwargs(LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE),
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
