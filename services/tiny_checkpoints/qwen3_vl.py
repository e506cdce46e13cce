"""Tiny random Qwen3-VL checkpoints (Qwen3VLForConditionalGeneration).

What differs from Qwen2/2.5-VL and is kept here: 16 px patches (32x32 px per merged token), a
learned position grid (`num_position_embeddings`) resampled to each image, deepstack (the tower's
`deepstack_visual_indexes` blocks each feed a merger whose rows are added to the LLM's hidden
states at the image positions, in its first layers), q/k RMSNorm in the LLM's attention and
interleaved mRoPE with an explicit `head_dim`.
"""

from __future__ import annotations

import torch

from services.tiny_checkpoints.common import (
    EOS_LOGIT_SCALE,
    BuildContext,
    StdFor,
    lm_head_std,
    padded_vocab_size,
    redraw_weights,
    save_checkpoint,
    silence_lm_head_rows,
    train_tokenizer_with_ids,
    variance_preserving_std,
)
from services.tiny_checkpoints.qwen2_5_vl import QWEN2_5_SPECIAL_TOKENS
from services.tiny_checkpoints.qwen2_vl import qwen_eos_ids, qwen_vl_processor, qwen_vl_token_kwargs

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

# text: hidden, layers, heads, kv heads, head_dim, intermediate, mrope_section (T, H, W; sums to
# head_dim/2; interleaved, so H and W each need 3 * section <= head_dim/2 as in the released [24, 20, 20])
# vision: depth, embed, heads, intermediate, learned position grid, deepstack blocks (one per
# early LLM layer, so at most `layers` of them); tokens per image (one merged token covers
# (patch 16 * merge 2)^2 = 32x32 pixels)
_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, mrope_section=[4, 2, 2],
        vision_depth=3, vision_embed=32, vision_heads=2, vision_intermediate=64,
        num_position_embeddings=64, deepstack_visual_indexes=[0, 1],
        min_tokens=4, max_tokens=64,  # 64x64 -> 4 tokens, 256x256 and up -> 64
        video_min_tokens=4, video_max_tokens=16,
    ),
    "bench": dict(
        hidden=384, layers=4, heads=6, kv_heads=2, head_dim=64, intermediate=1024, mrope_section=[12, 10, 10],
        vision_depth=8, vision_embed=256, vision_heads=4, vision_intermediate=512,
        num_position_embeddings=576, deepstack_visual_indexes=[1, 3, 5],
        min_tokens=4, max_tokens=256,  # 256x256 -> 64 tokens, 512x512 and up -> 256
        video_min_tokens=16, video_max_tokens=64,
    ),
}  # fmt: skip


def _std(hidden: int) -> StdFor:
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
        base = variance_preserving_std(param)
        if name.endswith("embed_tokens.weight"):
            return 1.0
        if name == "lm_head.weight":
            return lm_head_std(hidden)
        if name.endswith("visual.pos_embed.weight"):
            return 0.5
        if name.endswith("attn.qkv.weight") or ("merger" in name and name.endswith("linear_fc2.weight")):
            return 2.0 * base  # the fused qkv; the last linear of the merger and of each deepstack merger
        return base

    return std_for


def build(ctx: BuildContext) -> None:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    p = _SIZES[ctx.size]
    tokenizer, ids = train_tokenizer_with_ids(
        ctx.seed,
        QWEN3_VL_SPECIAL_TOKENS,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=262144,
    )

    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=padded_vocab_size(tokenizer),
            hidden_size=p["hidden"],
            intermediate_size=p["intermediate"],
            num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            head_dim=p["head_dim"],
            max_position_embeddings=262144,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": p["mrope_section"],
                "mrope_interleaved": True,
                "rope_theta": 5000000.0,
            },
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
            out_hidden_size=p["hidden"],  # the mergers project into the LLM's hidden size
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=p["num_position_embeddings"],
            deepstack_visual_indexes=p["deepstack_visual_indexes"],
            initializer_range=0.1,
        ),
        **qwen_vl_token_kwargs(ids),
    )
    model = Qwen3VLForConditionalGeneration(config).eval()
    redraw_weights(model, ctx.seed, _std(p["hidden"]))
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_norm.weight.fill_(_QK_NORM_GAIN)
            layer.self_attn.k_norm.weight.fill_(_QK_NORM_GAIN)
    eos = qwen_eos_ids(ids)
    silence_lm_head_rows(model.lm_head.weight, len(tokenizer), ids.values(), eos, EOS_LOGIT_SCALE)

    processor = qwen_vl_processor(
        Qwen3VLProcessor, Qwen2VLImageProcessor, Qwen3VLVideoProcessor, tokenizer, p,
        patch_size=16, chat_template=QWEN3_VL_CHAT_TEMPLATE, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )  # fmt: skip
    save_checkpoint(ctx.out_dir, model, processor, eos_token_ids=eos, pad_token_id=ids["<|endoftext|>"],
                    bos_token_id=ids["<|endoftext|>"])
