"""Tiny random Qwen2-VL checkpoints (Qwen2VLForConditionalGeneration)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from services.models.tiny.common import (BuildContext, fan_in, padded_vocab_size, redraw_weights,
                                         save_generation_config, train_bpe_tokenizer)

FAMILY = "qwen2_vl"

# Qwen2-VL's special tokens, in the order of the real tokenizer (ids follow the BPE vocabulary).
_QWEN2_VL_SPECIAL_TOKENS = (
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

# Scales the EOS rows of lm_head. Seen on tiny seeds 0/1 (random text prompts): at 1.0, 1 prompt in 8
# stops within 16 greedy tokens; at 0.9, ~1% within 8 tokens and 7-17% within 128.
_EOS_LOGIT_SCALE = 0.9

# One merged token covers (patch 14 * merge 2)^2 = 28x28 pixels.
_QWEN2_VL_PIXELS_PER_TOKEN = 28 * 28

# text: hidden, layers, heads, kv heads, intermediate, mrope_section (sums to head_dim/2)
# vision: depth, embed_dim, heads, mlp_ratio; tokens: min/max merged tokens per image
_QWEN2_VL_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, mrope_section=[2, 3, 3],
        vision_depth=2, vision_embed=32, vision_heads=2, mlp_ratio=2,
        min_tokens=4, max_tokens=64,  # 64x64 -> 4 tokens, 224x224 and up -> 64
        video_min_tokens=4, video_max_tokens=16,
    ),
    "bench": dict(
        hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024, mrope_section=[8, 12, 12],
        vision_depth=6, vision_embed=256, vision_heads=4, mlp_ratio=4,
        min_tokens=4, max_tokens=256,  # 224x224 -> 64 tokens, 448x448 and up -> 256
        video_min_tokens=16, video_max_tokens=64,
    ),
}  # fmt: skip


def _qwen2_vl_std(hidden: int) -> Callable[[str, torch.Tensor], float | None]:
    """Per-parameter std for Qwen2-VL, chosen so that outputs depend on the prompt and the image.

    - Token embeddings at std 1 (RMSNorm rescales them anyway) so tokens are well separated.
    - Linear layers at ~1/sqrt(fan_in) (variance-preserving) instead of 0.02, so layers actually
      transform the residual stream rather than passing the embedding through.
    - q/k larger (the vision tower's fused qkv too), so attention is peaked and the last position
      really reads earlier tokens (the image's among them); with flat attention every prompt
      averages to the same context.
    - The merger's output at the scale of the token embeddings, so image rows are not drowned out.
    - lm_head large enough for logits of std ~3: greedy picks depend on the hidden state.
    """

    def std_for(name: str, param: torch.Tensor) -> float | None:
        if param.ndim == 1:  # norms keep ones; biases get a little noise so they break symmetry
            return 0.02 if name.endswith("bias") else None
        base = 1.0 / math.sqrt(fan_in(param))
        if name.endswith("embed_tokens.weight"):
            return 1.0
        if name == "lm_head.weight":
            return 3.0 / math.sqrt(hidden)
        if name.endswith(("q_proj.weight", "k_proj.weight")) or name.endswith("attn.qkv.weight"):
            return 2.0 * base
        if "merger.mlp.2" in name:
            return 2.0 * base
        return base

    return std_for


def build(ctx: BuildContext) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    p = _QWEN2_VL_SIZES[ctx.size]
    tokenizer = train_bpe_tokenizer(
        ctx.seed,
        _QWEN2_VL_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN2_VL_SPECIAL_TOKENS}
    vocab_size = padded_vocab_size(tokenizer)

    config = Qwen2VLConfig(
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
            embed_dim=p["vision_embed"],
            hidden_size=p["hidden"],  # the merger projects into the LLM's hidden size
            num_heads=p["vision_heads"],
            mlp_ratio=p["mlp_ratio"],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            initializer_range=0.1,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    redraw_weights(model, ctx.seed, _qwen2_vl_std(p["hidden"]))
    with torch.no_grad():
        # Rows the model should never emit: padding beyond the tokenizer and the special tokens
        # other than EOS (placeholders belong to the processor; a generated <|image_pad|> would
        # confuse a serving engine). A zero row scores 0 while real rows spread around it, so
        # greedy never picks one in practice.
        eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
        never = [*range(len(tokenizer), vocab_size)] + [i for i in ids.values() if i not in eos]
        model.lm_head.weight[never] = 0.0
        # EOS stays reachable (stop handling needs it) but rarer, so that short greedy runs in
        # tests are rarely cut off after a token or two.
        model.lm_head.weight[eos] *= _EOS_LOGIT_SCALE
    model.save_pretrained(ctx.out_dir)
    save_generation_config(
        ctx.out_dir,
        eos_token_ids=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
    )

    px = _QWEN2_VL_PIXELS_PER_TOKEN
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
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(ctx.out_dir)
