"""Tiny random LLaVA-NeXT-Video checkpoints (LlavaNextVideoForConditionalGeneration: CLIP tower +
Llama), shaped like llava-hf/LLaVA-NeXT-Video-7B-hf.

Images are LLaVA-NeXT's "anyres" tiles (llava_next.py in this package). A video's frames go through
the same tower one by one, each frame's patch grid average-pooled 2x2 (`spatial_pool_stride`) before
the projector, so a frame of (crop / patch)^2 patches gives a quarter of that many tokens, and the
prompt's `<video>` becomes frames x that many `<video>` tokens. The tiny tower keeps patch 14 on
56 px crops: 4x4 patches, 4 tokens per frame.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.llava import llava_config_kwargs, llava_processor_kwargs, llava_std
from services.tiny_checkpoints.llava_next import _GRID_TILES

FAMILY = "llava_next_video"

# llava-hf/LLaVA-NeXT-Video-7B-hf: the Llama tokenizer's <unk> <s> </s>, then the added <video>
# (32000) and <image> (32001), and <pad>. Here the ids follow the BPE vocabulary in this order.
LLAVA_NEXT_VIDEO_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<video>", "<image>", "<pad>")

# The chat template of llava-hf/LLaVA-NeXT-Video-7B-hf (Vicuna): "USER: " + one "<image>\n" per image,
# then one "<video>\n" per video, then each text part + " ", then "ASSISTANT:".
LLAVA_NEXT_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# The shared text (Llama) and tower (CLIP) shapes with one tower layer more, as LLaVA-1.5's, plus the
# tile (crop) size; patch stays 14.
_SIZES = common.sizes(
    tiny=dict(vision_layers=3, image_size=56),  # 16 tokens per image tile, 4 per video frame
    bench=dict(vision_layers=7, image_size=224),  # 256 per tile, 64 per frame
)


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    p = _SIZES[ctx.size]
    tile = p["image_size"]
    pinpoints = [[h * tile, w * tile] for h, w in _GRID_TILES]
    vocab = common.train_vocab(ctx.seed, LLAVA_NEXT_VIDEO_SPECIAL_TOKENS, bos="<s>", pad="<pad>", stop=("</s>",),
                               unk_token="<unk>", add_bos_token=True, add_eos_token=False, model_max_length=4096)
    kwargs = llava_config_kwargs(p, vocab, "llama")
    patches = (tile // 14) ** 2
    config = LlavaNextVideoConfig(**kwargs, image_grid_pinpoints=pinpoints, video_token_index=vocab.ids["<video>"],
                                  spatial_pool_mode="average", spatial_pool_stride=2, video_seq_length=patches // 4)
    model = common.random_model(LlavaNextVideoForConditionalGeneration, config, ctx.seed, llava_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    crop = {"height": tile, "width": tile}
    image_processor = LlavaNextImageProcessor(  # llava-hf: shortest_edge 336, crop 336x336, bicubic, CLIP mean/std
        size={"shortest_edge": tile}, crop_size=crop, image_grid_pinpoints=pinpoints, do_center_crop=True,
        do_convert_rgb=True, do_pad=True, resample=3)
    video_processor = LlavaNextVideoVideoProcessor(  # llava-hf: shortest_edge 336, crop 336x336, bicubic
        size={"shortest_edge": tile}, crop_size=crop, do_center_crop=True, do_convert_rgb=True, resample=3)
    processor = LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        video_token="<video>",
        image_token="<image>",
        **llava_processor_kwargs(LLAVA_NEXT_VIDEO_CHAT_TEMPLATE),
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
