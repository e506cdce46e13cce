"""Tiny random Aya Vision checkpoints (AyaVisionForConditionalGeneration: SigLIP tower + Cohere2).

Served by the generic family (services/models/generic.py): Aya Vision has no family file of its own.

Aya Vision's processor expands each `<image>` in the prompt to `<|START_OF_IMG|>`, then per tile
`TILE_i` + n x `<|IMG_PATCH|>`, then `TILE_GLOBAL` + n x `<|IMG_PATCH|>` and `<|END_OF_IMG|>`; only the
`<|IMG_PATCH|>` positions (config `image_token_index`) take tower rows. CohereLabs/aya-vision-8b
crops an image into up to 12 tiles (`max_patches`) of the best-fitting grid plus a thumbnail, so one
image owns several placeholder runs, which the generic family assigns to it from the processor's
replacement offsets (ProcessedItem.runs). The tiny checkpoint keeps that with `max_patches=4`: an
image gives 1 run (one tile) or 2 to 4 tiles + the thumbnail.

Tiny sizes: patch 14 on a 112 px tile, 8x8 patches, pixel shuffle x2 (`downsample_factor`), a SwiGLU
projector: 16 `<|IMG_PATCH|>` tokens per tile, up to 5 tiles (80 rows) per image. The language model is Cohere2 (LayerNorm, parallel
attention + MLP, one sliding-window and one global layer) with tied embeddings, as the real model.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "aya_vision"

# Cohere's control tokens as the Aya Vision tokenizer has them, then its image tokens; ids after the
# BPE vocabulary in this order.
AYA_VISION_SPECIAL_TOKENS = (
    "<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>",
    "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>",
    "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL",
)  # fmt: skip

# The turn structure of CohereLabs/aya-vision-8b's chat template: <BOS_TOKEN>, an optional system turn,
# user turns whose image parts render as "<image>" (the processor expands it), then the chatbot turn.
# The hub template also inserts Cohere's long default system preamble when there is no system
# message; it is left out here (no network to copy it byte for byte, and it would make every tiny
# prompt a few hundred tokens long).
AYA_VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' }}"
    "{% elif message['role'] == 'user' %}{{ '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' }}"
    "{% else %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{% endif %}"
)

# Tiles per image before the thumbnail (aya-vision-8b: 12); kept small so that tests stay fast.
_MAX_TILES = 4

# Tied embeddings: special rows other than EOS are shrunk rather than zeroed, so that as inputs
# (turn tokens) they keep a direction while as outputs they score near 0 and are never picked.
_SPECIAL_ROW_SCALE = 0.05

# The shared text (Cohere2) and tower (SigLIP) shapes (common.sizes), plus the tile side (patch 14)
# and the pixel-shuffle factor.
_AYA_VISION_SIZES = common.sizes(
    tiny=dict(image_size=112, downsample=2),  # (112 / 14)^2 / 2^2 = 16 tokens per tile
    bench=dict(image_size=364, downsample=2),  # (364 / 14)^2 / 2^2 = 169 tokens per tile, as the real model
)


def _aya_vision_std(hidden: int) -> common.StdFor:
    """Per-parameter std, chosen so that greedy outputs depend on the prompt and the image.

    As Qwen2-VL's (qwen2_vl.py), linear layers at ~1/sqrt(fan_in) with larger q/k (peaked
    attention). What the tied embeddings add: the current token's own embedding, still in the
    residual stream at the last layer, scores itself through the tied lm_head, and greedy decoding
    falls into repeating one token (seen at std 1 everywhere). Small token embeddings (0.3) against
    a strong attention output (o_proj x4) let the context outweigh the current token. Chosen by
    trying a few scales on seed 0 with tests/parity.py's prompts: no case repeats one token.
    """

    return common.scaled_std(
        hidden,
        fixed={"position_embedding.weight": 0.5},
        embed_std=0.3,
        gains={
            ("q_proj.weight", "k_proj.weight"): 3.0,
            "o_proj.weight": 4.0,  # Cohere2's layers only: SigLIP's attention output is `out_proj`
            "multi_modal_projector.linear_2.weight": 3.0,
        },
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        GotOcr2ImageProcessor,
    )

    p = _AYA_VISION_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        AYA_VISION_SPECIAL_TOKENS,
        bos="<BOS_TOKEN>",
        pad="<PAD>",
        stop=("<|END_OF_TURN_TOKEN|>", "<EOS_TOKEN>"),
        unk_token="<UNK>",
        model_max_length=16384,
    )
    tile = p["image_size"]

    config = AyaVisionConfig(
        text_config=common.text_config(
            p,
            vocab,
            model_type="cohere2",
            max_position_embeddings=16384,
            layer_types=["sliding_attention"] * (p["layers"] - 1) + ["full_attention"],
            sliding_window=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            tie_word_embeddings=True,
        ),
        vision_config=common.vision_tower_config(
            p, model_type="siglip_vision_model", image_size=tile, patch_size=14, vision_use_head=False
        ),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        downsample_factor=p["downsample"],
        image_token_index=vocab.ids["<|IMG_PATCH|>"],
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = common.random_model(AyaVisionForConditionalGeneration, config, ctx.seed, _aya_vision_std(p["hidden"]))
    head = model.get_output_embeddings().weight  # tied: the token embeddings too
    common.quiet_tied_rows(head, vocab, _SPECIAL_ROW_SCALE)

    image_processor = GotOcr2ImageProcessor(  # aya-vision-8b: 364 px tiles, up to 12 (see the module docstring)
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        min_patches=1,
        max_patches=_MAX_TILES,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        patch_size=14,
        img_size=tile,
        downsample_factor=p["downsample"],
        chat_template=AYA_VISION_CHAT_TEMPLATE,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
