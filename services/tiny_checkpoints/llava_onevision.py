"""Tiny random LLaVA-OneVision checkpoints (LlavaOnevisionForConditionalGeneration: SigLIP tower +
Qwen2), shaped like llava-hf/llava-onevision-qwen2-0.5b-ov-hf.

Images: LLaVA-NeXT's "anyres" tiles plus a base view, unpadded to the image's aspect ratio, with an
image_newline row end per row, and then ("anyres_max_9") bilinearly shrunk when the unpadded grid
holds more than ~9 tiles' patches. The real pinpoints are every grid of 1..6 x 1..6 tiles of 384 px;
the tiny tower keeps patch 14 on 56 px tiles (4x4 = 16 tokens per tile) with the same grids, so a
test image of a few hundred pixels already reaches the shrinking step.
Video: each frame is one tile, its patch grid bilinearly pooled to half size (2x2 = 4 tokens here),
and one image_newline row closes the video.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "llava_onevision"

# The Qwen2 tokenizer's <|endoftext|> <|im_start|> <|im_end|>, then the added <image> (151646) and
# <video> (151647). Here the ids follow the BPE vocabulary in this order.
LLAVA_ONEVISION_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# The chat template of llava-hf/llava-onevision-qwen2-*-ov-hf: ChatML, the role followed by a space,
# all images ("<image>" each, no separator), then all videos, then "\n" + each text part.
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The shared text (Qwen2) and tower (SigLIP) shapes (common.sizes), plus the tile size; patch stays 14.
_SIZES = common.sizes(
    tiny=dict(image_size=56),  # 16 tokens per tile, 4 per video frame
    bench=dict(image_size=224),  # 256 per tile, 64 per frame
)

# llava-onevision's pinpoints in tiles (height, width): every grid of 1..6 x 1..6.
_GRID_TILES = tuple((h, w) for h in range(1, 7) for w in range(1, 7))


def _std(hidden: int) -> common.StdFor:
    """Per-parameter std, so that outputs depend on the prompt, the image and the video.

    As LLaVA's (llava.py in this package): token embeddings at std 1, linear layers at ~1/sqrt(fan_in),
    q/k doubled for peaked attention, the projector's output at the token embeddings' scale; the
    image_newline vector (not a norm) at std 1 and SigLIP's position table at 0.5 so patches differ
    by place.
    """
    return common.scaled_std(
        hidden,
        fixed={"image_newline": 1.0, "position_embedding.weight": 0.5},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.linear_2.weight": 2.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    p = _SIZES[ctx.size]
    tile = p["image_size"]
    vocab = common.train_vocab(ctx.seed, LLAVA_ONEVISION_SPECIAL_TOKENS, bos="<|endoftext|>", pad="<|endoftext|>",
                               stop=("<|im_end|>", "<|endoftext|>"), bos_token=None, model_max_length=8192)
    tokens_per_tile = (tile // 14) ** 2
    config = LlavaOnevisionConfig(
        text_config=common.text_config(p, vocab, model_type="qwen2", max_position_embeddings=8192,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        vision_config=common.vision_tower_config(p, model_type="siglip_vision_model", image_size=tile, patch_size=14,
                                                 vision_use_head=False, layer_norm_eps=1e-6),
        image_token_index=vocab.ids["<image>"],
        video_token_index=vocab.ids["<video>"],
        image_grid_pinpoints=[[h * tile, w * tile] for h, w in _GRID_TILES],
        vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full",  # SigLIP has no CLS token
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,  # the 7B and up; the 0.5B ties
        dtype="float32",
    )
    model = common.random_model(LlavaOnevisionForConditionalGeneration, config, ctx.seed, _std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    size = {"height": tile, "width": tile}
    half = [0.5, 0.5, 0.5]  # SigLIP's mean and std
    image_processor = LlavaOnevisionImageProcessor(  # llava-hf: 384 px tiles, bicubic, padded batches
        size=size, image_grid_pinpoints=config.image_grid_pinpoints, do_pad=True, do_convert_rgb=True, resample=3,
        image_mean=half, image_std=half)
    video_processor = LlavaOnevisionVideoProcessor(size=size, do_convert_rgb=True, resample=3, image_mean=half,
                                                   image_std=half)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        video_processor=video_processor,
        num_image_tokens=tokens_per_tile,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
