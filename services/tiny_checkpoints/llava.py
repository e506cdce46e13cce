"""Tiny random LLaVA-1.5 checkpoints (LlavaForConditionalGeneration: CLIP tower + Llama).

LLaVA-1.5 resizes and centre-crops every image to one square (336 px in llava-hf/llava-1.5-7b-hf),
so an image always gives (crop / patch)^2 placeholder tokens: the CLIP CLS token is dropped
(`vision_feature_select_strategy="default"`, `num_additional_image_tokens=1`). The tiny tower keeps
patch 14 and crops to 84 px: 6x6 = 36 tokens per image. The CLIP tower has 3 layers so that
`vision_feature_layer=-2` (the second-to-last layer's output, as the real model) still runs two.

The builder pieces (tokenizer, configs, weight scales, lm_head rows, processor, saving) are shared
with LLaVA-NeXT.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerFast, ProcessorMixin

from services.tiny_checkpoints.common import (
    EOS_LOGIT_SCALE,
    BuildContext,
    StdFor,
    padded_vocab_size,
    redraw_weights,
    save_checkpoint,
    scaled_std,
    silence_lm_head_rows,
    special_token_ids,
    train_bpe_tokenizer,
)

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


# text (Llama): hidden, layers, heads, kv heads, intermediate
# vision (CLIP): width, layers, heads, intermediate, image (crop) size; patch stays 14
_LLAVA_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
        vision_hidden=32, vision_layers=3, vision_heads=2, vision_intermediate=64, image_size=84,  # 36 tokens
    ),
    "bench": dict(
        hidden=384, layers=4, heads=6, kv_heads=2, intermediate=1024,
        vision_hidden=256, vision_layers=7, vision_heads=4, vision_intermediate=1024, image_size=224,  # 256 tokens
    ),
}  # fmt: skip


def llava_tokenizer(seed: int) -> PreTrainedTokenizerFast:
    """The BPE tokenizer with Llama's special tokens; encoding adds <s> in front, as Llama's does."""
    return train_bpe_tokenizer(
        seed,
        LLAVA_SPECIAL_TOKENS,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=4096,
    )


def llava_std(hidden: int) -> StdFor:
    """Per-parameter std for LLaVA checkpoints, so that outputs depend on the prompt and the image.

    As Qwen2-VL's (qwen2_vl.py in this package): token embeddings at std 1, linear layers at
    ~1/sqrt(fan_in), q/k doubled for peaked attention, lm_head for logits of std ~3. Besides:
    - the CLIP class embedding and LLaVA-NeXT's image_newline are vectors that are not norms: std 1
      (the default for vectors would make them all ones);
    - the projector's output at the scale of the token embeddings, so image rows are not drowned out.
    """
    return scaled_std(
        hidden,
        fixed={("class_embedding", "image_newline"): 1.0},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.linear_2.weight": 2.0},
    )


def llava_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of LLaVA's special tokens, by token."""
    return special_token_ids(tokenizer, LLAVA_SPECIAL_TOKENS)


def finish_and_save(out_dir: Path, model: PreTrainedModel, processor: ProcessorMixin,
                    tokenizer: PreTrainedTokenizerFast) -> None:
    """Silence the lm_head rows the model should never emit, then save model, generation config and
    processor. Llama's only stop token is </s>; EOS stays reachable but rarer (as Qwen2-VL's builder)."""
    ids = llava_ids(tokenizer)
    eos = [ids["</s>"]]
    silence_lm_head_rows(model.lm_head.weight, len(tokenizer), ids.values(), eos, EOS_LOGIT_SCALE)
    save_checkpoint(out_dir, model, processor, eos_token_ids=eos, pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"])


def text_config(p: dict, tokenizer: PreTrainedTokenizerFast, model_type: str) -> dict:
    """The language model's config (Llama for LLaVA-1.5, Mistral for LLaVA-NeXT-Mistral)."""
    ids = llava_ids(tokenizer)
    return dict(
        model_type=model_type,
        vocab_size=padded_vocab_size(tokenizer),
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        initializer_range=0.1,  # informative only: weights are re-drawn
        dtype="float32",
    )


def vision_config(p: dict) -> dict:
    """A small CLIP vision tower (llava-hf: 1024 wide, 24 layers, 336 px, patch 14, quick_gelu)."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=p["vision_hidden"],
        intermediate_size=p["vision_intermediate"],
        num_hidden_layers=p["vision_layers"],
        num_attention_heads=p["vision_heads"],
        image_size=p["image_size"],
        patch_size=14,
        projection_dim=p["vision_hidden"],
        hidden_act="quick_gelu",
        initializer_range=0.1,
    )


def llava_config_kwargs(p: dict, tokenizer: PreTrainedTokenizerFast, text_model_type: str) -> dict:
    """What LlavaConfig and LlavaNextConfig share: the towers, the image token, and the CLIP
    features (second-to-last layer, CLS dropped) fed through a GELU projector."""
    return dict(
        text_config=text_config(p, tokenizer, text_model_type),
        vision_config=vision_config(p),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
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


def build(ctx: BuildContext) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    p = _LLAVA_SIZES[ctx.size]
    tokenizer = llava_tokenizer(ctx.seed)
    config = LlavaConfig(**llava_config_kwargs(p, tokenizer, "llama"))
    model = LlavaForConditionalGeneration(config).eval()
    redraw_weights(model, ctx.seed, llava_std(p["hidden"]))

    size = p["image_size"]
    image_processor = CLIPImageProcessor(  # llava-hf: shortest_edge 336, crop 336x336, bicubic, CLIP mean/std
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        do_convert_rgb=True,
        resample=3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, **llava_processor_kwargs(LLAVA_1_5_CHAT_TEMPLATE)
    )
    finish_and_save(ctx.out_dir, model, processor, tokenizer)
