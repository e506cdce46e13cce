"""Tiny random Idefics3 checkpoints (Idefics3ForConditionalGeneration: SigLIP-style tower + Llama).

Served by the generic family (services/models/generic.py): Idefics3 has no family file of its own.

Idefics3 expands each `<image>` to `<fake_token_around_image><global-img>` + `image_seq_len` x
`<image>` + `<fake_token_around_image>`; the tower's output after the pixel-shuffle connector is
one row per `<image>` token. As HuggingFaceM4/Idefics3-8B-Llama3 and SmolVLM, `do_image_splitting=True`:
the processor resizes an image's longest edge to `size` (rounded up to whole tiles of `max_image_size`),
cuts it into rows x cols tiles, each `<fake_token_around_image><row_i_col_j>` + `image_seq_len` x
`<image>`, a newline after each row, then the global image (the whole image squared to
`max_image_size`) as above. One image thus owns rows * cols + 1 runs of `<image>`, which the generic
family assigns to it from the processor's replacement offsets (ProcessedItem.runs).

Tiny sizes: patch 14 on a 112 px tile, 8x8 patches, pixel shuffle x2 (`scale_factor`): 16 `<image>`
tokens per tile; `size` = 2 tiles' side (224 px; the real 4 x 364), so an image gives at most 2 x 2 tiles
plus the global one: 2 to 5 runs, 32 to 80 rows.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "idefics3"

# Idefics3-8B-Llama3's added tokens (Llama 3's begin/end of text, then the image tokens and the
# 6x6 tile tags the processor looks up), ids after the BPE vocabulary in this order.
IDEFICS3_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>",
    "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)),
)  # fmt: skip

# The chat template of HuggingFaceM4/Idefics3-8B-Llama3: "User:" + parts + "<end_of_utterance>\n",
# no space after the colon when the message opens with an image, then "Assistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Tiles along an image's longest edge (size = this many tiles' side); Idefics3-8B-Llama3 has 4.
_TILES_PER_SIDE = 2


# The shared text (Llama) and tower shapes (common.sizes), plus the square image side (patch 14) and
# the pixel-shuffle factor.
_IDEFICS3_SIZES = common.sizes(
    tiny=dict(image_size=112, scale_factor=2),  # (112 / 14)^2 / 2^2 = 16 tokens per image
    bench=dict(image_size=364, scale_factor=2),  # (364 / 14)^2 / 2^2 = 169 tokens per image, as the real model
)


def _idefics3_std(hidden: int) -> common.StdFor:
    """Per-parameter std, chosen (as Qwen2-VL's, tiny/qwen2_vl.py) so that outputs depend on the prompt
    and the image: token embeddings at std 1, linear layers at ~1/sqrt(fan_in) with q/k doubled,
    the connector's output at the scale of the token embeddings, lm_head for logits of std ~3;
    the tower's position embeddings at 0.5 so that patches differ by place."""

    return common.scaled_std(
        hidden,
        fixed={"position_embedding.weight": 0.5},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "connector.modality_projection.proj.weight": 3.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    p = _IDEFICS3_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        IDEFICS3_SPECIAL_TOKENS,
        bos="<|begin_of_text|>",
        pad="<|end_of_text|>",
        stop=("<end_of_utterance>", "<|end_of_text|>"),
        model_max_length=8192,
    )
    image_seq_len = (p["image_size"] // 14) ** 2 // p["scale_factor"] ** 2

    config = Idefics3Config(
        text_config=common.text_config(
            p,
            vocab,
            model_type="llama",
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        vision_config=common.vision_tower_config(p, image_size=p["image_size"], patch_size=14, initializer_range=0.1),
        scale_factor=p["scale_factor"],
        image_token_id=vocab.ids["<image>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = common.random_model(Idefics3ForConditionalGeneration, config, ctx.seed, _idefics3_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    side = p["image_size"]
    image_processor = Idefics3ImageProcessor(  # as Idefics3-8B-Llama3: splitting on (module docstring)
        do_image_splitting=True,
        size={"longest_edge": _TILES_PER_SIDE * side},
        max_image_size={"longest_edge": side},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        resample=1,  # Lanczos, as the real processor config
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=vocab.tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
