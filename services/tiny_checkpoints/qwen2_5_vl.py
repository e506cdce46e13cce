"""Tiny random Qwen2.5-VL checkpoints (Qwen2_5_VLForConditionalGeneration).

The vision tower keeps Qwen2.5-VL's window attention, full attention only in
`fullatt_block_indexes`. The released models' windows are 112 px (4x4 merged tokens); the tiny
ones are 56 px (2x2 merged tokens) so that even the tests' small images (3x3 merged tokens and up)
span several windows, some of them cut short at the image's edge.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen2_vl import (
    QWEN2_TEXT_SIZES,
    QWEN2_VL_CHAT_TEMPLATE,
    QWEN2_VL_SPECIAL_TOKENS,
    finish_qwen_vl,
    qwen2_text_config,
    qwen2_vl_std,
    qwen_vl_processor,
    qwen_vl_token_kwargs,
    qwen_vocab,
)

FAMILY = "qwen2_5_vl"

# Qwen2.5's added tokens, in the order of the real tokenizer (ids follow the BPE vocabulary):
# Qwen2-VL's, then tool calls and fill-in-the-middle.
QWEN2_5_SPECIAL_TOKENS = (
    *QWEN2_VL_SPECIAL_TOKENS,
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# Qwen/Qwen2.5-VL-*-Instruct ship Qwen2-VL's chat template unchanged.
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE


# The text model and token budgets are Qwen2-VL's (QWEN2_TEXT_SIZES).
# vision: depth, embed, heads, intermediate, window (px), full-attention blocks
_VISION_SIZES: dict[str, dict] = {
    "tiny": dict(
        vision_depth=4, vision_embed=32, vision_heads=2, vision_intermediate=64,
        window_size=56, fullatt_block_indexes=[1, 3],
    ),
    "bench": dict(
        vision_depth=8, vision_embed=256, vision_heads=4, vision_intermediate=512,
        window_size=112, fullatt_block_indexes=[3, 7],
    ),
}  # fmt: skip
assert set(_VISION_SIZES) == set(common.SIZES)


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    p = {**QWEN2_TEXT_SIZES[ctx.size], **_VISION_SIZES[ctx.size]}
    vocab = qwen_vocab(ctx.seed, QWEN2_5_SPECIAL_TOKENS, model_max_length=32768)
    config = Qwen2_5_VLConfig(
        text_config=qwen2_text_config(p, vocab),
        vision_config=dict(
            depth=p["vision_depth"],
            hidden_size=p["vision_embed"],
            intermediate_size=p["vision_intermediate"],
            num_heads=p["vision_heads"],
            out_hidden_size=p["hidden"],  # the merger projects into the LLM's hidden size
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            window_size=p["window_size"],
            fullatt_block_indexes=p["fullatt_block_indexes"],
            initializer_range=0.1,
        ),
        **qwen_vl_token_kwargs(vocab),
    )
    # Same parameter names as Qwen2-VL (fused tower qkv, merger.mlp.2), so the same scales.
    model = common.random_model(Qwen2_5_VLForConditionalGeneration, config, ctx.seed, qwen2_vl_std(p["hidden"]))
    processor = qwen_vl_processor(
        Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor, vocab.tokenizer, p,
        patch_size=14, chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )  # fmt: skip
    finish_qwen_vl(ctx, model, processor, vocab)
