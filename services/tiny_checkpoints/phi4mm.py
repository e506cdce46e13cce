"""Tiny random Phi-4-multimodal checkpoints (Phi4MultimodalForCausalLM, loaded with AutoModelForCausalLM).

Phi-4-MM cuts an image into 448x448 crops plus one global 448x448 view and its token count formula in
the image processor is written for 448 px crops of 14 px patches (32x32 patches, pooled 2x2 to 16x16
tokens per crop). So the tiny vision tower keeps image_size 448 and patch 14 and is made small in width
and depth instead; `dynamic_hd` caps the crops per image so a CPU encodes an image in milliseconds.
The audio tower (a conformer over the real 80-bin log-mel feature extractor's frames, 8x time
reduction) is built small too, with both projection pairs (speech, and vision-speech for prompts with
images); outputs vary with the clip at the shared weight scales, so it needs no scale of its own.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "phi4mm"

# Phi-4-multimodal's special tokens (transformers-format checkpoint: <|image|> and <|audio|> are the
# renamed <|endoftext10|>/<|endoftext11|>); ids follow the BPE vocabulary in this order.
_PHI4MM_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|image|>", "<|audio|>",
    "<|assistant|>", "<|end|>", "<|user|>", "<|system|>",
    "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>",
)  # fmt: skip

# The chat template of the transformers-format microsoft/Phi-4-multimodal-instruct: one <|image|> /
# <|audio|> per item (the processor expands each to the item's token count), no newlines between turns.
PHI4MM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif content['type'] == 'audio' %}{{ '<|audio|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}"
    "{{ '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}"
    "{% endif %}"
    "{{ '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


# The shared text and tower shapes (common.sizes; head_dim * 0.75 rotary dims, as the real model;
# the tower's image_size/patch stay 448/14, the token formula needs them), plus the audio tower's
# width, conformer blocks, heads and intermediate, and dynamic_hd: at most this many 448 px crops
# per image.
_PHI4MM_SIZES = common.sizes(
    tiny=dict(audio_hidden=32, audio_blocks=1, audio_heads=2, audio_intermediate=64, dynamic_hd=4),
    bench=dict(audio_hidden=128, audio_blocks=2, audio_heads=4, audio_intermediate=256, dynamic_hd=9),
)

_PARTIAL_ROTARY_FACTOR = 0.75
_ORIGINAL_MAX_POSITIONS = 4096  # longrope: short factors up to here, long factors beyond
_MAX_POSITIONS = 131072


def _longrope_factors(num: int) -> tuple[list[float], list[float]]:
    """Per-frequency rescale factors shaped like the real ones: short ~1, long rising to ~30."""
    short = [round(1.0 + 0.02 * i, 4) for i in range(num)]
    long = [round(1.0 + 29.0 * (i / max(num - 1, 1)) ** 2, 4) for i in range(num)]
    return short, long


def _phi4mm_std(hidden: int) -> common.StdFor:
    """Per-parameter std for Phi-4-MM, chosen so that outputs depend on the prompt and the image.

    As for Qwen2-VL (see qwen2_vl.qwen2_vl_std): token embeddings at std 1, linear layers
    variance-preserving, attention q/k (the text model's fused qkv, the towers' q/k) twice that so
    attention is peaked, lm_head for logits of std ~3. The image projection ends at the scale of the
    token embeddings, and the two learned separators (`*_img_feature_extensor`, zero after HF's init)
    get unit-scale values so they are not just zeros between the image rows; the tower's position
    embeddings at 0.5 so that patches differ by place.
    """

    return common.scaled_std(
        hidden,
        fixed={"img_feature_extensor": 1.0, "position_embedding.weight": 0.5},
        gains={("qkv_proj.weight", "q_proj.weight", "k_proj.weight"): 2.0, "img_projection_down.weight": 2.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Phi4MultimodalConfig,
        Phi4MultimodalFeatureExtractor,
        Phi4MultimodalForCausalLM,
        Phi4MultimodalImageProcessor,
        Phi4MultimodalProcessor,
    )

    p = _PHI4MM_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        _PHI4MM_SPECIAL_TOKENS,
        bos="<|endoftext|>",
        pad="<|endoftext|>",
        stop=("<|end|>", "<|endoftext|>"),
        eos_token="<|endoftext|>",  # the tokenizer's; generation stops at <|end|> first
        unk_token="<|endoftext|>",
        # Phi4MultimodalProcessor reads tokenizer.image_token(_id) and tokenizer.audio_token(_id).
        extra_special_tokens={"image_token": "<|image|>", "audio_token": "<|audio|>"},
        model_max_length=_MAX_POSITIONS,
    )
    tokenizer, ids = vocab.tokenizer, vocab.ids
    tokenizer.chat_template = PHI4MM_CHAT_TEMPLATE  # the processor does not keep it: the tokenizer does

    head_dim = p["hidden"] // p["heads"]
    short_factor, long_factor = _longrope_factors(int(head_dim * _PARTIAL_ROTARY_FACTOR) // 2)
    config = Phi4MultimodalConfig(
        # One config for the text model and the towers, as the real config.json.
        **common.text_config(
            p,
            vocab,
            max_position_embeddings=_MAX_POSITIONS,
            original_max_position_embeddings=_ORIGINAL_MAX_POSITIONS,
            # As the real config.json: rope_scaling of type longrope; transformers 5.23 turns it into
            # rope_parameters (and warns that original_max_position_embeddings is set, as for the real one).
            rope_scaling={"type": "longrope", "short_factor": short_factor, "long_factor": long_factor},
            partial_rotary_factor=_PARTIAL_ROTARY_FACTOR,
            eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
            # The real checkpoint ties lm_head to the token embeddings; untied here so that the builder
            # can silence special tokens in lm_head without zeroing their input embeddings.
            tie_word_embeddings=False,
        ),
        vision_config=common.vision_tower_config(
            p, image_size=448, patch_size=14, crop_size=448, feature_layer=-2, image_token_id=ids["<|image|>"]
        ),
        audio_config=dict(
            hidden_size=p["audio_hidden"],
            intermediate_size=p["audio_intermediate"],
            num_blocks=p["audio_blocks"],
            num_attention_heads=p["audio_heads"],
            ext_pw_out_channel=p["audio_hidden"],
            depthwise_separable_out_channel=p["audio_hidden"],
            nemo_conv_channels=p["audio_hidden"],
            audio_token_id=ids["<|audio|>"],
        ),
    )
    model = common.random_model(Phi4MultimodalForCausalLM, config, ctx.seed, _phi4mm_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    processor = Phi4MultimodalProcessor(
        image_processor=Phi4MultimodalImageProcessor(dynamic_hd=p["dynamic_hd"]),
        audio_processor=Phi4MultimodalFeatureExtractor(),
        tokenizer=tokenizer,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
