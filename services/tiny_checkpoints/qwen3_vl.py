"""Tiny random Qwen3-VL checkpoints (Qwen3VLForConditionalGeneration).

What differs from Qwen2/2.5-VL and is kept here: 16 px patches (32x32 px per merged token), a
learned position grid (`num_position_embeddings`) resampled to each image, deepstack (the tower's
`deepstack_visual_indexes` blocks each feed a merger whose rows are added to the LLM's hidden
states at the image positions, in its first layers), q/k RMSNorm in the LLM's attention and
interleaved mRoPE with an explicit `head_dim`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen2_5_vl import QWEN2_5_SPECIAL_TOKENS
from services.tiny_checkpoints.qwen2_vl import finish_qwen_vl, qwen_vl_processor, qwen_vl_token_kwargs, qwen_vocab

FAMILY = "qwen3_vl"

# Qwen3's added tokens extend Qwen2.5's, in the order of the real tokenizer.
QWEN3_VL_SPECIAL_TOKENS = (*QWEN2_5_SPECIAL_TOKENS, "<tool_response>", "</tool_response>", "<think>", "</think>")

# The chat template of Qwen/Qwen3-VL-*-Instruct: no default system prompt, tools, and one
# <|vision_start|><|image_pad|><|vision_end|> per image that the processor expands.
QWEN3_VL_CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""


# Query/key RMSNorm weights: the norms fix |q| and |k|, so peaked attention (the last position
# really reading the image) comes from these gains, not from larger q/k projections.
_QK_NORM_GAIN = 2.0

# The shared text shape (common.TEXT_SIZES) plus head_dim and mrope_section (T, H, W; sums to
# head_dim/2; interleaved, so H and W each need 3 * section <= head_dim/2 as in the released
# [24, 20, 20]); vision: depth, embed, heads, intermediate, learned position grid, deepstack blocks
# (one per early LLM layer, so at most `layers` of them); tokens per image (one merged token covers
# (patch 16 * merge 2)^2 = 32x32 pixels)
_SIZES = common.sizes(
    tiny=dict(
        head_dim=16, mrope_section=[4, 2, 2],
        vision_depth=3, vision_embed=32, vision_heads=2, vision_intermediate=64,
        num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        min_tokens=4, max_tokens=64,  # 64x64 -> 4 tokens, 256x256 and up -> 64
        video_min_tokens=4, video_max_tokens=16,
    ),
    bench=dict(
        head_dim=64, mrope_section=[12, 10, 10],
        vision_depth=8, vision_embed=256, vision_heads=4, vision_intermediate=512,
        num_position_embeddings=576, deepstack_visual_indexes=[1, 3, 5],
        min_tokens=4, max_tokens=256,  # 256x256 -> 64 tokens, 512x512 and up -> 256
        video_min_tokens=16, video_max_tokens=64,
    ),
    shared=(common.TEXT_SIZES,),
)  # fmt: skip


def qwen3_vl_std(hidden: int) -> common.StdFor:
    """Per-parameter std so that greedy outputs depend on the prompt and on the image.

    Embeddings at std 1, linears variance-preserving, the tower's fused qkv twice that so its
    attention is peaked, the learned position grid at the scale of the patch embeddings, the
    mergers' outputs (main and deepstack) at the token embeddings' scale, lm_head for logits of
    std ~3. Norm weights keep ones (LayerNorm biases zeros); q/k norms are raised after the draw.
    Not `scaled_std`: no q/k gain here (q/k are normed), and the deepstack mergers' names differ.
    """

    def std_for(name: str, param: torch.Tensor) -> float | None:
        if param.ndim == 1:
            return 0.02 if name.endswith("bias") and "norm" not in name else None
        base = common.variance_preserving_std(param)
        if name.endswith("embed_tokens.weight"):
            return 1.0
        if name == "lm_head.weight":
            return common.lm_head_std(hidden)
        if name.endswith("visual.pos_embed.weight"):
            return 0.5
        if name.endswith("attn.qkv.weight") or ("merger" in name and name.endswith("linear_fc2.weight")):
            return 2.0 * base  # the fused qkv; the last linear of the merger and of each deepstack merger
        return base

    return std_for


def build(ctx: common.BuildContext) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    build_qwen3_vl(ctx, Qwen3VLConfig, Qwen3VLForConditionalGeneration)


def build_qwen3_vl(ctx: common.BuildContext, config_class: type, model_class: type, *, text_keys: dict | None = None,
                   vision_keys: dict | None = None, std: Callable[[int], common.StdFor] = qwen3_vl_std) -> None:
    """A Qwen3-VL-style checkpoint of `model_class`: the families built on Qwen3-VL's tower and processor
    (Qwen3-VL-MoE, Qwen3.5) pass their config and model classes, the language model's own keys
    (`text_keys`, e.g. experts; they replace Qwen3-VL's head_dim and rope), vision keys that replace
    Qwen3-VL's (`vision_keys`; None drops one) and their `std`."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    p = _SIZES[ctx.size]
    vocab = qwen_vocab(ctx.seed, QWEN3_VL_SPECIAL_TOKENS, model_max_length=262144)
    config = config_class(
        text_config=common.text_config(
            p,
            vocab,
            **{
                "head_dim": p["head_dim"],
                "max_position_embeddings": 262144,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": p["mrope_section"],
                    "mrope_interleaved": True,
                    "rope_theta": 5000000.0,
                },
            } | (text_keys or {}),
        ),
        vision_config=_without_none(dict(
            depth=p["vision_depth"],
            hidden_size=p["vision_embed"],
            intermediate_size=p["vision_intermediate"],
            num_heads=p["vision_heads"],
            out_hidden_size=p["hidden"],  # the mergers project into the LLM's hidden size
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=p["num_position_embeddings"],
            deepstack_visual_indexes=p["deepstack_visual_indexes"],
            initializer_range=0.1,
        ) | (vision_keys or {})),
        **qwen_vl_token_kwargs(vocab),
    )
    model = common.random_model(model_class, config, ctx.seed, std(p["hidden"]))
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            attention = getattr(layer, "self_attn", None)  # Qwen3.5's linear-attention layers have none
            if attention is not None:
                attention.q_norm.weight.fill_(_QK_NORM_GAIN)
                attention.k_norm.weight.fill_(_QK_NORM_GAIN)
    processor = qwen_vl_processor(
        Qwen3VLProcessor, Qwen2VLImageProcessor, Qwen3VLVideoProcessor, vocab.tokenizer, p,
        patch_size=16, chat_template=QWEN3_VL_CHAT_TEMPLATE, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    finish_qwen_vl(ctx, model, processor, vocab)


def _without_none(keys: dict) -> dict:
    return {key: value for key, value in keys.items() if value is not None}
