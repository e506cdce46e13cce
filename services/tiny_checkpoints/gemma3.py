"""Tiny random Gemma 3 checkpoints (Gemma3ForConditionalGeneration: SigLIP tower + Gemma 3 text model).

Gemma 3 resizes every image to one square (896 px in google/gemma-3-4b-it, SigLIP patch 14: 64x64
patches) and average-pools the tower's output to a fixed `mm_tokens_per_image` (256: 16x16). The tiny
tower keeps that shape at a smaller scale: 64 px, patch 8 (8x8 patches), pooled 2x2 to 4x4 = 16 tokens
per image. The text model keeps what makes Gemma 3 different from a plain decoder: embeddings scaled by
sqrt(hidden), (1 + w) RMS norms around attention and MLP, q/k norms, and sliding-window layers beside
full ones (the sliding window is small, so it really cuts the context of the prompts in tests).
Word embeddings are tied to lm_head, as the real checkpoints.
"""

from __future__ import annotations

import math

import torch

from services.tiny_checkpoints import common

FAMILY = "gemma3"

# Gemma 3's special tokens (the real ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <start_of_turn> 105,
# <end_of_turn> 106, <start_of_image> 255999, <end_of_image> 256000, <image_soft_token> 262144);
# here their ids follow the BPE vocabulary in this order.
GEMMA3_SPECIAL_TOKENS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
    "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)  # fmt: skip

# The chat template of google/gemma-3-4b-it: <bos>, a system message folded into the first user
# turn, "model" for the assistant's role, one <start_of_image> per image (the processor expands it to
# "\n\n<start_of_image>" + N x <image_soft_token> + "<end_of_image>\n\n"), text parts trimmed.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Scales the other special tokens' rows: tied weights cannot zero them (they are also the input
# embeddings of <start_of_turn> etc.), so they are made small enough that greedy rarely emits them.
_SPECIAL_ROW_SCALE = 0.3

# The shared text and tower (SigLIP) shapes (common.sizes; six bench layers here), plus the text
# head_dim and sliding window (tokens), the (1 + w) norm weights w set after the draw (see `build`:
# q/k norms, post-attention/post-MLP norms), the image size and patch, and the pooled tokens per image.
_GEMMA3_SIZES = common.sizes(
    tiny=dict(
        head_dim=16, sliding_window=16, qk_norm=1.0, post_norm=1.0, image_size=64, patch=8,
        tokens_per_image=16,  # 8x8 patches pooled 2x2
    ),
    bench=dict(
        layers=6, head_dim=64, sliding_window=128,
        qk_norm=2.0, post_norm=3.0,  # seen: at 1.0/1.0 six layers decode one repeated token
        image_size=224, patch=14,
        tokens_per_image=64,  # 16x16 patches pooled 2x2
    ),
)  # fmt: skip


def _gemma3_std(vision_hidden: int) -> common.StdFor:
    """Per-parameter std for Gemma 3, chosen so that outputs depend on the prompt and the image.

    - Gemma's RMS norms multiply by (1 + w): w = 0 is the identity, so they are drawn at std 0 (the
      q/k norms, the post-attention/post-MLP norms and the final norm are raised after the draw,
      see `build`).
    - Token embeddings at 1/sqrt(hidden): the model multiplies them by sqrt(hidden), so the residual
      stream starts at RMS ~1, the scale of what each (post-normed) layer adds to it.
    - Linear layers at ~1/sqrt(fan_in); SigLIP's position embeddings at std 0.5 so patches differ.
    - The projector's matrix (vision width x text hidden, used as x @ W) at 2/sqrt(vision width), so
      image rows come in at about twice the scale of the text embeddings and are not drowned out.
      `_init_weights` zeroes it, which would make a fresh model ignore the pixels.
    """

    def std_for(name: str, param: torch.Tensor) -> float | None:
        if name.endswith("mm_input_projection_weight"):
            return 2.0 / math.sqrt(vision_hidden)
        if param.ndim == 1:
            if "norm" in name and "vision_tower" not in name:
                return 0.0  # Gemma RMSNorm: (1 + w)
            # SigLIP LayerNorms keep ones/zeros; linear biases get a little noise
            return 0.02 if name.endswith("bias") and "norm" not in name else None
        if name.endswith("embed_tokens.weight"):
            return 1.0 / math.sqrt(param.shape[1])
        if name.endswith("position_embedding.weight"):
            return 0.5
        return common.variance_preserving_std(param)

    return std_for


def build(ctx: common.BuildContext) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    p = _GEMMA3_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        GEMMA3_SPECIAL_TOKENS,
        bos="<bos>",
        pad="<pad>",
        stop=("<eos>", "<end_of_turn>"),  # gemma-3-*-it: generation stops at <eos> or <end_of_turn>
        unk_token="<unk>",
        mask_token="<mask>",
        # What Gemma3Processor reads from the tokenizer (the real tokenizer_config.json has them too)
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        model_max_length=32768,
    )
    patches_per_side = p["image_size"] // p["patch"]
    tokens_per_side = math.isqrt(p["tokens_per_image"])
    assert tokens_per_side**2 == p["tokens_per_image"] and patches_per_side % tokens_per_side == 0, p

    config = Gemma3Config(
        text_config=common.text_config(
            p,
            vocab,
            head_dim=p["head_dim"],
            query_pre_attn_scalar=p["head_dim"],
            sliding_window=p["sliding_window"],
            # gemma-3: five sliding layers per full one; tiny: alternate, starting with a sliding one
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p["layers"])],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            max_position_embeddings=32768,
        ),
        vision_config=common.vision_tower_config(
            p,
            model_type="siglip_vision_model",
            image_size=p["image_size"],
            patch_size=p["patch"],
            vision_use_head=False,
            layer_norm_eps=1e-6,
        ),
        mm_tokens_per_image=p["tokens_per_image"],
        boi_token_index=vocab.ids["<start_of_image>"],
        eoi_token_index=vocab.ids["<end_of_image>"],
        image_token_index=vocab.ids["<image_soft_token>"],
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = common.random_model(Gemma3ForConditionalGeneration, config, ctx.seed, _gemma3_std(p["vision_hidden"]))
    text = model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            # q/k norms rescale q and k to RMS (1 + w): w >= 1 makes attention peaked enough that the
            # last position reads earlier tokens (the image's among them) rather than an average.
            layer.self_attn.q_norm.weight.fill_(p["qk_norm"])
            layer.self_attn.k_norm.weight.fill_(p["qk_norm"])
            # What attention and MLP add to the residual stream comes out of these norms at RMS
            # (1 + w): w >= 1 makes it outweigh the token's own embedding. At w = 0 the tied head reads
            # back the last input token and every prompt decodes to one repeated token.
            layer.post_attention_layernorm.weight.fill_(p["post_norm"])
            layer.post_feedforward_layernorm.weight.fill_(p["post_norm"])
        # Logits = final-normed hidden @ embedding^T (tied): (1 + 2) * sqrt(hidden) * 1/sqrt(hidden)
        # gives logits of std ~3, so greedy picks depend on the hidden state.
        text.norm.weight.fill_(2.0)
    common.quiet_tied_rows(text.embed_tokens.weight, vocab, _SPECIAL_ROW_SCALE)

    size = p["image_size"]
    image_processor = Gemma3ImageProcessor(  # gemma-3: 896x896, bilinear, mean/std 0.5, no pan-and-scan
        size={"height": size, "width": size},
        resample=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=p["tokens_per_image"],
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
