"""Tiny random Qwen2.5-VL checkpoints (Qwen2_5_VLForConditionalGeneration).

The vision tower keeps Qwen2.5-VL's window attention, full attention only in
`fullatt_block_indexes`. The released models' windows are 112 px (4x4 merged tokens); the tiny
ones are 56 px (2x2 merged tokens) so that even the tests' small images (3x3 merged tokens and up)
span several windows, some of them cut short at the image's edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from services.models.tiny.common import (BuildContext, fan_in, padded_vocab_size, redraw_weights,
                                         save_generation_config, train_bpe_tokenizer)
from services.models.tiny.qwen2_vl import QWEN2_VL_CHAT_TEMPLATE

FAMILY = "qwen2_5_vl"

# Qwen2.5's added tokens, in the order of the real tokenizer (ids follow the BPE vocabulary).
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip

# Qwen/Qwen2.5-VL-*-Instruct ship Qwen2-VL's chat template unchanged.
QWEN2_5_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE

# Scales the EOS rows of lm_head so that short greedy runs in tests are rarely cut off.
_EOS_LOGIT_SCALE = 0.9

# One merged token covers (patch 14 * merge 2)^2 = 28x28 pixels.
_PIXELS_PER_TOKEN = 28 * 28

# text: hidden, layers, heads, kv heads, intermediate, mrope_section (sums to head_dim/2)
# vision: depth, embed, heads, intermediate, window (px), full-attention blocks; tokens per image
_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, mrope_section=[2, 3, 3],
        vision_depth=4, vision_embed=32, vision_heads=2, vision_intermediate=64,
        window_size=56, fullatt_block_indexes=[1, 3],
        min_tokens=4, max_tokens=64,  # 64x64 -> 4 tokens, 224x224 and up -> 64
        video_min_tokens=4, video_max_tokens=16,
    ),
    "bench": dict(
        hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024, mrope_section=[8, 12, 12],
        vision_depth=8, vision_embed=256, vision_heads=4, vision_intermediate=512,
        window_size=112, fullatt_block_indexes=[3, 7],
        min_tokens=4, max_tokens=256,  # 224x224 -> 64 tokens, 448x448 and up -> 256
        video_min_tokens=16, video_max_tokens=64,
    ),
}  # fmt: skip


def _std(hidden: int) -> Callable[[str, torch.Tensor], float | None]:
    """Per-parameter std so that greedy outputs depend on the prompt and on the image.

    As for Qwen2-VL: embeddings at std 1, linears variance-preserving, q/k (and the tower's fused
    qkv) twice that so attention is peaked, the merger's output at the token embeddings' scale,
    lm_head for logits of std ~3.
    """

    def std_for(name: str, param: torch.Tensor) -> float | None:
        if param.ndim == 1:  # norms keep ones; biases get a little noise so they break symmetry
            return 0.02 if name.endswith("bias") else None
        base = 1.0 / math.sqrt(fan_in(param))
        if name.endswith("embed_tokens.weight"):
            return 1.0
        if name == "lm_head.weight":
            return 3.0 / math.sqrt(hidden)
        if name.endswith(("q_proj.weight", "k_proj.weight", "attn.qkv.weight")) or "merger.mlp.2" in name:
            return 2.0 * base
        return base

    return std_for


def silence_special_rows(model: torch.nn.Module, tokenizer, ids: dict[str, int], vocab_size: int) -> None:
    """Zeroes lm_head rows the model should never emit and makes EOS a little rarer.

    Padding beyond the tokenizer and the special tokens other than EOS (a generated
    <|image_pad|> would confuse a serving engine) score 0 while real rows spread around it.
    """
    with torch.no_grad():
        eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        never = [*range(len(tokenizer), vocab_size)] + [i for i in ids.values() if i not in eos]
        model.lm_head.weight[never] = 0.0
        model.lm_head.weight[eos] *= _EOS_LOGIT_SCALE


def build(ctx: BuildContext) -> None:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    p = _SIZES[ctx.size]
    tokenizer = train_bpe_tokenizer(
        ctx.seed,
        QWEN2_5_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_5_SPECIAL_TOKENS}
    vocab_size = padded_vocab_size(tokenizer)

    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=p["hidden"],
            intermediate_size=p["intermediate"],
            num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            max_position_embeddings=32768,
            max_window_layers=p["layers"],
            rope_parameters={"rope_type": "default", "mrope_section": p["mrope_section"], "rope_theta": 1000000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            initializer_range=0.1,  # informative only: weights are re-drawn below
            dtype="float32",
        ),
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
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    redraw_weights(model, ctx.seed, _std(p["hidden"]))
    silence_special_rows(model, tokenizer, ids, vocab_size)
    model.save_pretrained(ctx.out_dir)
    save_generation_config(
        ctx.out_dir,
        eos_token_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )

    px = _PIXELS_PER_TOKEN
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": p["min_tokens"] * px, "longest_edge": p["max_tokens"] * px},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": p["video_min_tokens"] * px, "longest_edge": p["video_max_tokens"] * px},
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(ctx.out_dir)
