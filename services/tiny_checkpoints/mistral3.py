"""Tiny random Mistral3 checkpoints (Mistral3ForConditionalGeneration: Pixtral tower + Mistral), shaped
like mistralai/Mistral-Small-3.1-24B-Instruct-2503.

Served by the generic family (services/models/generic.py): Mistral3 has no family file of its own.

The Pixtral processor resizes an image so its longest edge fits `size["longest_edge"]` and both sides
are whole multiples of patch_size * spatial_merge_size, then expands each `[IMG]` in the prompt to one
row of `[IMG]` per row of merged patches, each row closed by `[IMG_BREAK]`, the last one by
`[IMG_END]` instead. Only `[IMG]` positions (config `image_token_index`) take tower rows, so one image
owns one run per row, which the generic family assigns to it from the processor's replacement
offsets (ProcessedItem.runs). The tower (2-D RoPE, block-diagonal attention over the images of a
call) takes `image_sizes` beside the pixels; the projector merges 2 x 2 patches (`spatial_merge_size`).

Tiny sizes: patch 14, merge 2 (28 px per row/column token), longest edge 112 px: at most 4 rows of 4
`[IMG]`, 16 rows per image.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "mistral3"

# Mistral-Small-3.1's control tokens (Tekken: <unk>, <s>, </s>, then [INST] ...), ids after the BPE
# vocabulary in this order.
MISTRAL3_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
)  # fmt: skip

# The turn structure of Mistral-Small-3.1-24B-Instruct-2503's chat template: <s>, an optional
# [SYSTEM_PROMPT] turn, user turns as [INST] ... [/INST] with image parts as [IMG] (the processor
# expands it), assistant turns closed by </s>. The hub template also inserts a long default system
# prompt (with today's date) when there is none; it is left out here, as in the Aya Vision builder.
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST]' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}"
    "{% if block['type'] == 'text' %}{{ block['text'] }}"
    "{% elif block['type'] in ['image', 'image_url'] %}{{ '[IMG]' }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '[/SYSTEM_PROMPT]' }}"
    "{% elif message['role'] == 'user' %}{{ '[/INST]' }}{% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)


# The shared text (Mistral) and tower (Pixtral) shapes (common.sizes), plus the longest image edge
# (patch 14, merge 2).
_MISTRAL3_SIZES = common.sizes(
    tiny=dict(longest_edge=112),  # at most (112 / 28)^2 = 16 tokens per image
    bench=dict(longest_edge=364),  # at most (364 / 28)^2 = 169 tokens per image
)


def _mistral3_std(hidden: int) -> common.StdFor:
    """Per-parameter std, as the Idefics3 builder's (idefics3.py): token embeddings at std 1,
    linear layers at ~1/sqrt(fan_in) with q/k doubled, the projector's output at the scale of the
    token embeddings, lm_head for logits of std ~3. Pixtral has no position table (2-D RoPE)."""

    return common.scaled_std(
        hidden,
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.linear_2.weight": 3.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessor, PixtralProcessor

    p = _MISTRAL3_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        MISTRAL3_SPECIAL_TOKENS,
        bos="<s>",
        pad="<unk>",
        stop=("</s>",),
        pad_token=None,  # the tokenizer has none; the configs pad with <unk>
        unk_token="<unk>",
        model_max_length=131072,
    )
    patch, merge = 14, 2

    config = Mistral3Config(
        text_config=common.text_config(
            p,
            vocab,
            model_type="mistral",
            head_dim=p["hidden"] // p["heads"],
            max_position_embeddings=131072,
            sliding_window=None,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000000.0},
            tie_word_embeddings=False,
        ),
        vision_config=common.vision_tower_config(
            p,
            model_type="pixtral",
            head_dim=p["vision_hidden"] // p["vision_heads"],
            image_size=p["longest_edge"],
            patch_size=patch,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        image_token_index=vocab.ids["[IMG]"],
        spatial_merge_size=merge,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = common.random_model(Mistral3ForConditionalGeneration, config, ctx.seed, _mistral3_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    image_processor = PixtralImageProcessor(  # Mistral-Small-3.1: longest edge 1540, patch 14
        size={"longest_edge": p["longest_edge"]},
        patch_size=patch,
    )
    processor = PixtralProcessor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=MISTRAL3_CHAT_TEMPLATE,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
