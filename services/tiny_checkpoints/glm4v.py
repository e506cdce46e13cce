"""Tiny random GLM-4.1V checkpoints (Glm4vForConditionalGeneration).

Also the GLM-V pieces that GLM-4.6V and GLM-4.5V (glm4v_moe) reuse: the special tokens and
tokenizer, the chat template, the text and vision configs, the weight scales and the processor.

What GLM-V has of its own: a Qwen2-VL-like tower (14 px patches, 2x2 merge, 2-frame temporal patch)
whose learned position grid (`image_size`/`patch_size` per side) is resampled bicubically to each
image, merged by a 2x2 conv and a gated MLP; a GLM-4 language model with partial rotary (half of each
head) whose rotary half is mRoPE over (time, height, width) with `mrope_section`; `<|image|>` repeated
once per merged token between `<|begin_of_image|>` and `<|end_of_image|>`.
"""

from __future__ import annotations

from collections.abc import Callable

from transformers import ProcessorMixin

from services.tiny_checkpoints import common

FAMILY = "glm4v"

# GLM-4's added tokens, in the order of the real tokenizer (ids follow the BPE vocabulary).
GLM4V_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>", "<think>", "</think>",
)  # fmt: skip

# The chat template of zai-org/GLM-4.1V-9B-Thinking, less tools: `[gMASK]<sop>`, role tokens, one
# <|begin_of_image|><|image|><|end_of_image|> per image that the processor expands.
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for msg in messages %}"
    "{%- if msg.role == 'system' %}<|system|>\n"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'user' %}<|user|>\n"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}"
    "{%- if item.type == 'video' or 'video' in item %}<|begin_of_video|><|video|><|end_of_video|>"
    "{%- elif item.type == 'image' or 'image' in item %}<|begin_of_image|><|image|><|end_of_image|>"
    "{%- elif item.type == 'text' %}{{ item.text }}"
    "{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{%- elif msg.role == 'assistant' %}<|assistant|>\n"
    "{%- if msg.content is string %}{{ msg.content }}{%- else %}"
    "{%- for item in msg.content %}{%- if item.type == 'text' %}{{ item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# The text shape with head_dim 32 (hidden 128 / 4 heads), whose rotary half (16) is mRoPE: 8
# frequencies split (T, H, W) by mrope_section; vision: depth, width, heads, intermediate (also the
# merger's), the learned position grid's side in pixels (image_size / 14 patches per side); tokens per
# image and per video frame group (one merged token covers 28x28 pixels).
GLM_SIZES = common.sizes(
    tiny=dict(
        hidden=128, intermediate=256, mrope_section=[2, 3, 3],
        vision_depth=2, vision_embed=32, vision_heads=2, vision_intermediate=64, image_size=112,
        min_tokens=4, max_tokens=64, video_min_tokens=4, video_max_tokens=16,
    ),
    bench=dict(
        mrope_section=[4, 6, 6],  # head_dim 64 (hidden 384 / 6 heads): 16 rotary frequencies
        vision_depth=6, vision_embed=256, vision_heads=4, vision_intermediate=1024, image_size=336,
        min_tokens=4, max_tokens=256, video_min_tokens=16, video_max_tokens=64,
    ),
    shared=(common.TEXT_SIZES,),
)  # fmt: skip


def glm_vocab(seed: int) -> common.Vocab:
    """A GLM-4 tokenizer: turns end at <|user|> or <|observation|> (the next speaker), or at <|endoftext|>,
    which also pads and is the configs' bos (the template writes [gMASK]<sop> itself)."""
    return common.train_vocab(seed, GLM4V_SPECIAL_TOKENS, bos="<|endoftext|>", pad="<|endoftext|>",
                              stop=("<|endoftext|>", "<|user|>", "<|observation|>"), bos_token=None,
                              model_max_length=65536)


def glm_text_config(p: dict, vocab: common.Vocab, **family_keys: object) -> dict:
    """The GLM-4 language model: attention biases, half of each head rotary, mRoPE on that half."""
    return common.text_config(
        p, vocab, max_position_embeddings=65536, attention_bias=True,
        rope_parameters={"rope_type": "default", "mrope_section": p["mrope_section"], "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5},
        **family_keys,
    )  # fmt: skip


def glm_vision_config(p: dict) -> dict:
    return dict(
        depth=p["vision_depth"],
        hidden_size=p["vision_embed"],
        intermediate_size=p["vision_intermediate"],
        num_heads=p["vision_heads"],
        out_hidden_size=p["hidden"],  # the downsample conv and merger project into the LLM's hidden size
        image_size=p["image_size"],
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=0.1,
    )


def glm_token_kwargs(vocab: common.Vocab) -> dict:
    """The GLM-V config's media token ids; lm_head untied, as released."""
    ids = vocab.ids
    return dict(
        image_token_id=ids["<|image|>"],
        video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"],
        image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"],
        video_end_token_id=ids["<|end_of_video|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def glm_std(hidden: int) -> common.StdFor:
    """As Qwen2-VL's (qwen2_vl.qwen2_vl_std): q/k and the tower's fused qkv twice the variance-preserving
    std for peaked attention, the merger's output at the token embeddings' scale; the learned position
    grid at the scale of the patch embeddings."""
    return common.scaled_std(
        hidden,
        fixed={"embeddings.position_embedding.weight": 0.5},
        gains={("q_proj.weight", "k_proj.weight", "attn.qkv.weight"): 2.0, "merger.down_proj.weight": 2.0},
    )


def glm_processor(processor_class: type, image_processor_class: type, video_processor_class: type,
                  vocab: common.Vocab, p: dict) -> ProcessorMixin:
    """A GLM-V processor whose pixel budgets are `p`'s token counts. GLM's smart_resize counts an image
    as 2 frames (its temporal patch), so the budgets are twice tokens x 28 x 28 pixels."""
    px = 2 * 28 * 28
    common_kwargs = dict(patch_size=14, temporal_patch_size=2, merge_size=2)
    return processor_class(
        image_processor=image_processor_class(
            size={"shortest_edge": p["min_tokens"] * px, "longest_edge": p["max_tokens"] * px}, **common_kwargs),
        tokenizer=vocab.tokenizer,
        video_processor=video_processor_class(
            size={"shortest_edge": p["video_min_tokens"] * px, "longest_edge": p["video_max_tokens"] * px},
            **common_kwargs),
        chat_template=GLM4V_CHAT_TEMPLATE,
    )


def build_glm_v(ctx: common.BuildContext, config_class: type, model_class: type,
                processor_classes: tuple[type, type, type], *, text_keys: dict | None = None,
                vision_keys: dict | None = None, std: Callable[[int], common.StdFor] = glm_std) -> None:
    """Every GLM-V build: `config_class`'s configs at GLM_SIZES (plus the variant's keys), random weights
    scaled by `std`, the processor from (processor, image processor, video processor) classes, the
    lm_head rows the model should never emit silenced, saved."""
    p = GLM_SIZES[ctx.size]
    vocab = glm_vocab(ctx.seed)
    config = config_class(text_config=glm_text_config(p, vocab, **(text_keys or {})),
                          vision_config=glm_vision_config(p) | (vision_keys or {}), **glm_token_kwargs(vocab))
    model = common.random_model(model_class, config, ctx.seed, std(p["hidden"]))
    processor = glm_processor(*processor_classes, vocab, p)
    common.silence_lm_head_rows(model.lm_head.weight, vocab)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Glm4vConfig,
        Glm4vForConditionalGeneration,
        Glm4vImageProcessor,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    build_glm_v(ctx, Glm4vConfig, Glm4vForConditionalGeneration,
                (Glm4vProcessor, Glm4vImageProcessor, Glm4vVideoProcessor))
