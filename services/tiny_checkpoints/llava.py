"""Tiny random LLaVA-1.5 checkpoints (LlavaForConditionalGeneration: CLIP tower + Llama).

LLaVA-1.5 resizes and centre-crops every image to one square (336 px in llava-hf/llava-1.5-7b-hf),
so an image always gives (crop / patch)^2 placeholder tokens: the CLIP CLS token is dropped
(`vision_feature_select_strategy="default"`, `num_additional_image_tokens=1`). The tiny tower keeps
patch 14 and crops to 84 px: 6x6 = 36 tokens per image. The CLIP tower has 3 layers so that
`vision_feature_layer=-2` (the second-to-last layer's output, as the real model) still runs two.

The builder pieces (tokenizer, configs, weight scales, processor) are shared with LLaVA-NeXT.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "llava"

# The Llama tokenizer's special tokens as llava-hf ships them: <unk> <s> </s>, then the added
# <image> (32000) and <pad> (32001). Here their ids follow the BPE vocabulary in this order.
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<image>", "<pad>")

# The chat template of llava-hf/llava-1.5-7b-hf: "USER: " + one "<image>\n" per image (all images
# first) + each text part + " ", then "ASSISTANT:". The Llama tokenizer adds <s> in front.
LLAVA_1_5_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# The shared text (Llama) and tower (CLIP) shapes (common.sizes) with one tower layer more (so that
# vision_feature_layer=-2 still runs two), plus the image (crop) size; patch stays 14.
_LLAVA_SIZES = common.sizes(
    tiny=dict(vision_layers=3, image_size=84),  # 36 tokens
    bench=dict(vision_layers=7, image_size=224),  # 256 tokens
)


def llava_vocab(seed: int) -> common.Vocab:
    """The BPE tokenizer with Llama's special tokens; encoding adds <s> in front, as Llama's does.
    Llama's only stop token is </s>."""
    return common.train_vocab(
        seed,
        LLAVA_SPECIAL_TOKENS,
        bos="<s>",
        pad="<pad>",
        stop=("</s>",),
        unk_token="<unk>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=4096,
    )


def llava_std(hidden: int) -> common.StdFor:
    """Per-parameter std for LLaVA checkpoints, so that outputs depend on the prompt and the image.

    As Qwen2-VL's (qwen2_vl.py in this package): token embeddings at std 1, linear layers at
    ~1/sqrt(fan_in), q/k doubled for peaked attention, lm_head for logits of std ~3. Besides:
    - the CLIP class embedding and LLaVA-NeXT's image_newline are vectors that are not norms: std 1
      (the default for vectors would make them all ones);
    - the projector's output at the scale of the token embeddings, so image rows are not drowned out.
    """
    return common.scaled_std(
        hidden,
        fixed={("class_embedding", "image_newline"): 1.0},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.linear_2.weight": 2.0},
    )


def llava_config_kwargs(p: dict, vocab: common.Vocab, text_model_type: str) -> dict:
    """What LlavaConfig and LlavaNextConfig share: the language model (Llama for LLaVA-1.5, Mistral
    for LLaVA-NeXT-Mistral), a small CLIP tower (llava-hf: 1024 wide, 24 layers, 336 px, patch 14,
    quick_gelu), the image token, and the CLIP features (second-to-last layer, CLS dropped) fed
    through a GELU projector."""
    return dict(
        text_config=common.text_config(
            p, vocab, model_type=text_model_type, max_position_embeddings=4096, rms_norm_eps=1e-5
        ),
        vision_config=common.vision_tower_config(
            p,
            model_type="clip_vision_model",
            image_size=p["image_size"],
            patch_size=14,
            projection_dim=p["vision_hidden"],
            hidden_act="quick_gelu",
            initializer_range=0.1,
        ),
        image_token_index=vocab.ids["<image>"],
        image_seq_length=(p["image_size"] // 14) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        tie_word_embeddings=False,
        dtype="float32",
    )


def llava_processor_kwargs(chat_template: str) -> dict:
    """What LlavaProcessor and LlavaNextProcessor share: CLIP's patch 14 and its CLS token."""
    return dict(
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped again by "default"
        chat_template=chat_template,
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    p = _LLAVA_SIZES[ctx.size]
    vocab = llava_vocab(ctx.seed)
    config = LlavaConfig(**llava_config_kwargs(p, vocab, "llama"))
    model = common.random_model(LlavaForConditionalGeneration, config, ctx.seed, llava_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    size = p["image_size"]
    image_processor = CLIPImageProcessor(  # llava-hf: shortest_edge 336, crop 336x336, bicubic, CLIP mean/std
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_convert_rgb=True,
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=vocab.tokenizer, **llava_processor_kwargs(LLAVA_1_5_CHAT_TEMPLATE)
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
