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

from services.tiny_checkpoints.common import (
    EOS_LOGIT_SCALE,
    BuildContext,
    StdFor,
    padded_vocab_size,
    redraw_weights,
    save_checkpoint,
    scaled_std,
    silence_lm_head_rows,
    train_tokenizer_with_ids,
)

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


# text (Llama): hidden, layers, heads, kv heads, intermediate
# vision: width, layers, heads, intermediate, square image side (patch 14), pixel-shuffle factor
_IDEFICS3_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
        vision_hidden=32, vision_layers=2, vision_heads=2, vision_intermediate=64, image_size=112, scale_factor=2,
    ),  # (112 / 14)^2 / 2^2 = 16 tokens per image
    "bench": dict(
        hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024,
        vision_hidden=256, vision_layers=6, vision_heads=4, vision_intermediate=1024, image_size=364, scale_factor=2,
    ),  # (364 / 14)^2 / 2^2 = 169 tokens per image, as the real model
}  # fmt: skip


def _idefics3_std(hidden: int) -> StdFor:
    """Per-parameter std, chosen (as Qwen2-VL's, tiny/qwen2_vl.py) so that outputs depend on the prompt
    and the image: token embeddings at std 1, linear layers at ~1/sqrt(fan_in) with q/k doubled,
    the connector's output at the scale of the token embeddings, lm_head for logits of std ~3;
    the tower's position embeddings at 0.5 so that patches differ by place."""

    return scaled_std(
        hidden,
        fixed={"position_embedding.weight": 0.5},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "connector.modality_projection.proj.weight": 3.0},
    )


def build(ctx: BuildContext) -> None:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor, Idefics3Processor

    p = _IDEFICS3_SIZES[ctx.size]
    tokenizer, ids = train_tokenizer_with_ids(
        ctx.seed,
        IDEFICS3_SPECIAL_TOKENS,
        bos_token="<|begin_of_text|>",
        eos_token="<end_of_utterance>",
        pad_token="<|end_of_text|>",
        model_max_length=8192,
    )
    image_seq_len = (p["image_size"] // 14) ** 2 // p["scale_factor"] ** 2

    config = Idefics3Config(
        text_config=dict(
            model_type="llama",
            vocab_size=padded_vocab_size(tokenizer),
            hidden_size=p["hidden"],
            intermediate_size=p["intermediate"],
            num_hidden_layers=p["layers"],
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=ids["<end_of_utterance>"],
            pad_token_id=ids["<|end_of_text|>"],
            initializer_range=0.1,  # informative only: weights are re-drawn below
            dtype="float32",
        ),
        vision_config=dict(
            hidden_size=p["vision_hidden"],
            intermediate_size=p["vision_intermediate"],
            num_hidden_layers=p["vision_layers"],
            num_attention_heads=p["vision_heads"],
            image_size=p["image_size"],
            patch_size=14,
            initializer_range=0.1,
        ),
        scale_factor=p["scale_factor"],
        image_token_id=ids["<image>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = Idefics3ForConditionalGeneration(config).eval()
    redraw_weights(model, ctx.seed, _idefics3_std(p["hidden"]))
    eos = [ids["<end_of_utterance>"], ids["<|end_of_text|>"]]
    silence_lm_head_rows(model.lm_head.weight, len(tokenizer), ids.values(), eos, EOS_LOGIT_SCALE)

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
        tokenizer=tokenizer,
        image_seq_len=image_seq_len,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    save_checkpoint(ctx.out_dir, model, processor, eos_token_ids=eos, pad_token_id=ids["<|end_of_text|>"],
                    bos_token_id=ids["<|begin_of_text|>"])
