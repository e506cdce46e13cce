"""Tiny random InternVL checkpoints (InternVLForConditionalGeneration, the transformers-native port of
InternVL3: InternViT tower + pixel shuffle + MLP projector + Qwen2 language model).

InternVL cuts an image into square tiles (448 px in OpenGVLab/InternVL3-*-hf): the tile grid is
the one of at most `max_patches` tiles whose aspect ratio is closest to the image's, plus a
thumbnail of the whole image when there is more than one tile. Each tile gives
(tile / patch)^2 x downsample_ratio^2 tokens (256 at 448 px, patch 14, ratio 0.5), so the token
count varies with the image's aspect ratio. The tiny tower keeps that shape: 64 px tiles, patch 8
(8x8 patches), pixel-shuffled 2x2 to 16 tokens per tile, at most 6 tiles per image.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen2_vl import QWEN2_VL_SPECIAL_TOKENS

FAMILY = "internvl"

# InternVL3-*-hf: Qwen2-VL's special tokens (the first of Qwen2.5's), then the added <img> </img>
# <IMG_CONTEXT> <quad> </quad> <ref> </ref> <box> </box> (the real <IMG_CONTEXT> is 151667), and
# <video> for the processor's video placeholder. Here the ids follow the BPE vocabulary in this order.
INTERNVL_SPECIAL_TOKENS = (
    *QWEN2_VL_SPECIAL_TOKENS,
    "<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
)  # fmt: skip

# The chat template that transformers' convert_internvl_weights_to_hf.py gives the -hf checkpoints:
# ChatML without a default system prompt, one "<IMG_CONTEXT>\n" per image (the processor expands it
# to <img> + <IMG_CONTEXT> x (tokens per tile x tiles) + </img>).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)


# The shared text (Qwen2) and tower (InternViT) shapes (common.sizes), plus the tile size, the patch
# and the most tiles per image.
_INTERNVL_SIZES = common.sizes(
    tiny=dict(tile=64, patch=8, max_tiles=6),  # 16 tokens per tile
    bench=dict(tile=224, patch=14, max_tiles=6),  # 64 tokens per tile
)


def _internvl_std(hidden: int) -> common.StdFor:
    """Per-parameter std for InternVL, so that outputs depend on the prompt and the image.

    As Qwen2-VL's (qwen2_vl.py in this package): token embeddings at std 1, linear layers at
    ~1/sqrt(fan_in), q/k doubled for peaked attention, lm_head for logits of std ~3, the projector's
    output at the scale of the token embeddings. Besides, the tower's CLS token and absolute position
    embeddings (zeroed by `_init_weights`) are drawn so that patches differ by place; the layer-scale
    vectors (lambda_1/2) keep ones.
    """

    return common.scaled_std(
        hidden,
        fixed={"embeddings.cls_token": 1.0, "embeddings.position_embeddings": 0.5},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.linear_2.weight": 2.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    p = _INTERNVL_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        INTERNVL_SPECIAL_TOKENS,
        bos="<|endoftext|>",
        pad="<|endoftext|>",
        stop=("<|im_end|>", "<|endoftext|>"),
        bos_token=None,
        # What InternVLProcessor reads from the tokenizer (as the -hf checkpoints' tokenizer_config.json)
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
        model_max_length=8192,
    )
    downsample_ratio = 0.5
    tokens_per_tile = int((p["tile"] // p["patch"]) ** 2 * downsample_ratio**2)

    config = InternVLConfig(
        text_config=common.text_config(
            p,
            vocab,
            model_type="qwen2",
            max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        vision_config=common.vision_tower_config(
            p,
            image_size=[p["tile"], p["tile"]],
            patch_size=[p["patch"], p["patch"]],
            use_absolute_position_embeddings=True,  # as the converted checkpoints
            use_mean_pooling=True,
            norm_type="layer_norm",
            initializer_range=0.1,
        ),
        image_token_id=vocab.ids["<IMG_CONTEXT>"],
        image_seq_length=tokens_per_tile,
        downsample_ratio=downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drops the CLS token
        tie_word_embeddings=False,  # InternVL3-2B and up; the 1B ties
        dtype="float32",
    )
    model = common.random_model(InternVLForConditionalGeneration, config, ctx.seed, _internvl_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    tile = {"height": p["tile"], "width": p["tile"]}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet, as InternVL3
    image_processor = GotOcr2ImageProcessor(  # InternVL3-hf: 448 px tiles, bicubic, 1..12 tiles
        size=tile,
        crop_to_patches=True,
        min_patches=1,
        max_patches=p["max_tiles"],
        resample=3,
        image_mean=mean,
        image_std=std,
        do_convert_rgb=True,
    )
    video_processor = InternVLVideoProcessor(size=tile, resample=3, image_mean=mean, image_std=std)
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        video_processor=video_processor,
        image_seq_length=tokens_per_tile,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
