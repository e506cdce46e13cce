"""Tiny random PaddleOCR-VL checkpoints (PaddleOCRVLForConditionalGeneration).

Qwen2-VL's text shape and weight scales (qwen2_vl.py) with PaddleOCR-VL's configs (an ERNIE-4.5-style
text model with mRoPE, a SigLIP-style tower with axial rope and a 2x2 merge), its processor (the
tokenizer's `image_token` repeated once per merged patch) and a chat template in the form of
PaddlePaddle/PaddleOCR-VL's: <|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> per image.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen2_vl import QWEN2_TEXT_SIZES, qwen2_vl_std

FAMILY = "paddleocr_vl"

SPECIAL_TOKENS = ("<|begin_of_sentence|>", "<|end_of_sentence|>", "<unk>", "<|IMAGE_START|>",
                  "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_END|>", "<|video_pad|>")

# PaddlePaddle/PaddleOCR-VL's template, shortened: "User: " turns with the image markers before the text.
CHAT_TEMPLATE = (
    "<|begin_of_sentence|>{% for message in messages %}"
    "{% if message['role'] == 'user' %}User: {% elif message['role'] == 'assistant' %}Assistant: "
    "{% else %}{{ message['role'] }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|end_of_sentence|>{% else %}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
)

def build(ctx: common.BuildContext) -> None:
    from transformers import (
        PaddleOCRVLConfig,
        PaddleOCRVLForConditionalGeneration,
        PaddleOCRVLImageProcessor,
        PaddleOCRVLProcessor,
    )

    p = {**QWEN2_TEXT_SIZES[ctx.size], **common.TOWER_SIZES[ctx.size]}
    vocab = common.train_vocab(
        ctx.seed, SPECIAL_TOKENS, bos="<|begin_of_sentence|>", pad="<unk>", stop=("<|end_of_sentence|>",),
        unk_token="<unk>", extra_special_tokens={"image_token": "<|IMAGE_PLACEHOLDER|>"}, model_max_length=32768,
    )  # fmt: skip
    head_dim = p["hidden"] // p["heads"]
    config = PaddleOCRVLConfig(
        text_config=common.text_config(
            p, vocab, head_dim=head_dim, max_position_embeddings=32768, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "mrope_section": p["mrope_section"], "rope_theta": 500000.0},
        ),
        vision_config=dict(
            hidden_size=p["vision_hidden"], intermediate_size=p["vision_intermediate"],
            num_hidden_layers=p["vision_layers"], num_attention_heads=p["vision_heads"],
            patch_size=14, image_size=112, spatial_merge_size=2,
        ),
        image_token_id=vocab.ids["<|IMAGE_PLACEHOLDER|>"],
        video_token_id=vocab.ids["<|video_pad|>"],
        vision_start_token_id=vocab.ids["<|IMAGE_START|>"],
        vision_end_token_id=vocab.ids["<|IMAGE_END|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )  # fmt: skip
    model = common.random_model(PaddleOCRVLForConditionalGeneration, config, ctx.seed, qwen2_vl_std(p["hidden"]))
    px = 28 * 28  # one merged token: (14 px patch x 2)^2
    image_processor = PaddleOCRVLImageProcessor(
        size={"shortest_edge": p["min_tokens"] * px, "longest_edge": p["max_tokens"] * px},
        patch_size=14, temporal_patch_size=1, merge_size=2,
    )  # fmt: skip
    processor = PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=vocab.tokenizer,
                                     chat_template=CHAT_TEMPLATE)
    common.silence_lm_head_rows(model.lm_head.weight, vocab)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
