"""Tiny random Qwen2-VL checkpoints (Qwen2VLForConditionalGeneration).

Also the Qwen-VL pieces that Qwen2.5-VL and Qwen3-VL reuse: the special tokens and tokenizer, the
language model's shape and config, the weight scales, the image/video processor set-up and the
end of the build.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from services.tiny_checkpoints import common

FAMILY = "qwen2_vl"

# Qwen2-VL's special tokens, in the order of the real tokenizer (ids follow the BPE vocabulary).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# The chat template of Qwen/Qwen2-VL-*-Instruct: one <|vision_start|><|image_pad|><|vision_end|>
# per image (the processor expands <|image_pad|> to the image's merged-patch count), a default
# system prompt when the first message is not a system one.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# The shared text shape (common.TEXT_SIZES) plus mrope_section (sums to head_dim/2) and the min/max
# merged tokens per image and per video. Qwen2.5-VL keeps both (its LLM is the same).
QWEN2_TEXT_SIZES = common.sizes(
    tiny=dict(
        mrope_section=[2, 3, 3],
        min_tokens=4, max_tokens=64,  # 64x64 -> 4 tokens, 224x224 and up -> 64
        video_min_tokens=4, video_max_tokens=16,
    ),
    bench=dict(
        mrope_section=[8, 12, 12],
        min_tokens=4, max_tokens=256,  # 224x224 -> 64 tokens, 448x448 and up -> 256
        video_min_tokens=16, video_max_tokens=64,
    ),
    shared=(common.TEXT_SIZES,),
)  # fmt: skip

# vision: depth, embed_dim, heads, mlp_ratio
_QWEN2_VL_VISION_SIZES: dict[str, dict] = {
    "tiny": dict(vision_depth=2, vision_embed=32, vision_heads=2, mlp_ratio=2),
    "bench": dict(vision_depth=6, vision_embed=256, vision_heads=4, mlp_ratio=4),
}
assert set(_QWEN2_VL_VISION_SIZES) == set(common.SIZES)


def qwen2_vl_std(hidden: int) -> common.StdFor:
    """Per-parameter std for Qwen2-VL (and Qwen2.5-VL), chosen so that outputs depend on the prompt
    and the image.

    - Token embeddings at std 1 (RMSNorm rescales them anyway) so tokens are well separated.
    - Linear layers at ~1/sqrt(fan_in) (variance-preserving) instead of 0.02, so layers actually
      transform the residual stream rather than passing the embedding through.
    - q/k larger (the vision tower's fused qkv too), so attention is peaked and the last position
      really reads earlier tokens (the image's among them); with flat attention every prompt
      averages to the same context.
    - The merger's output at the scale of the token embeddings, so image rows are not drowned out.
    - lm_head large enough for logits of std ~3: greedy picks depend on the hidden state.
    """
    return common.scaled_std(
        hidden,
        gains={("q_proj.weight", "k_proj.weight", "attn.qkv.weight"): 2.0, "merger.mlp.2.weight": 2.0},
    )


def qwen_vocab(seed: int, special_tokens: tuple[str, ...], model_max_length: int) -> common.Vocab:
    """A Qwen tokenizer: chat models stop at the end of a turn (<|im_end|>) or of the text
    (<|endoftext|>), which also pads and is the configs' bos (the tokenizer adds none)."""
    return common.train_vocab(
        seed,
        special_tokens,
        bos="<|endoftext|>",
        pad="<|endoftext|>",
        stop=("<|im_end|>", "<|endoftext|>"),
        bos_token=None,
        model_max_length=model_max_length,
    )


def qwen2_text_config(p: dict, vocab: common.Vocab) -> dict:
    """The Qwen2 language model of Qwen2-VL and Qwen2.5-VL: mRoPE over (time, height, width)."""
    return common.text_config(
        p,
        vocab,
        max_position_embeddings=32768,
        max_window_layers=p["layers"],
        rope_parameters={"rope_type": "default", "mrope_section": p["mrope_section"], "rope_theta": 1000000.0},
    )


def qwen_vl_token_kwargs(vocab: common.Vocab) -> dict:
    """The Qwen-VL config's media token ids; lm_head untied, as the released 2B/3B-and-up models."""
    return dict(
        image_token_id=vocab.ids["<|image_pad|>"],
        video_token_id=vocab.ids["<|video_pad|>"],
        vision_start_token_id=vocab.ids["<|vision_start|>"],
        vision_end_token_id=vocab.ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def finish_qwen_vl(ctx: common.BuildContext, model: PreTrainedModel, processor: ProcessorMixin,
                   vocab: common.Vocab) -> None:
    """Silence the lm_head rows the model should never emit and save: the end of every Qwen-VL build."""
    common.silence_lm_head_rows(model.lm_head.weight, vocab)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)


def qwen_vl_processor(
    processor_cls: type,
    image_processor_cls: type,
    video_processor_cls: type,
    tokenizer: PreTrainedTokenizerFast,
    p: dict,
    *,
    patch_size: int,
    chat_template: str,
    **image_kwargs: Any,
) -> ProcessorMixin:
    """A Qwen-VL processor whose pixel budgets are `p`'s token counts: one merged token covers
    (patch x merge 2)^2 pixels, so min/max tokens become shortest/longest_edge in pixels."""
    px = (patch_size * 2) ** 2
    image_processor = image_processor_cls(
        size={"shortest_edge": p["min_tokens"] * px, "longest_edge": p["max_tokens"] * px},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        **image_kwargs,
    )
    video_processor = video_processor_cls(
        size={"shortest_edge": p["video_min_tokens"] * px, "longest_edge": p["video_max_tokens"] * px},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
    )
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    p = {**QWEN2_TEXT_SIZES[ctx.size], **_QWEN2_VL_VISION_SIZES[ctx.size]}
    vocab = qwen_vocab(ctx.seed, QWEN2_VL_SPECIAL_TOKENS, model_max_length=32768)
    config = Qwen2VLConfig(
        text_config=qwen2_text_config(p, vocab),
        vision_config=dict(
            depth=p["vision_depth"],
            embed_dim=p["vision_embed"],
            hidden_size=p["hidden"],  # the merger projects into the LLM's hidden size
            num_heads=p["vision_heads"],
            mlp_ratio=p["mlp_ratio"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=0.1,
        ),
        **qwen_vl_token_kwargs(vocab),
    )
    model = common.random_model(Qwen2VLForConditionalGeneration, config, ctx.seed, qwen2_vl_std(p["hidden"]))
    processor = qwen_vl_processor(
        Qwen2VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, vocab.tokenizer, p,
        patch_size=14, chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    finish_qwen_vl(ctx, model, processor, vocab)
