"""Tiny random Llama 3.2 Vision checkpoints (MllamaForConditionalGeneration).

Llama 3.2 Vision's images never enter the token sequence: each image is one `<|image|>` token, and
its tiles' vision states reach the language model through gated cross-attention layers
(meta-llama/Llama-3.2-11B-Vision: 40 layers, cross-attention at 3, 8, ..., 38). The tiny model keeps
that layout at small sizes: 4 text layers, cross-attention at 1 and 3 (layer 0 stays self-attention,
as in the real model, so the cache's first layer is the text timeline); a tower of 56 px tiles, patch
14 (16 patches + CLS per tile, padded to 24 by the tower), up to 4 tiles per image, 2 local + 1 global
layers, and the concatenated intermediate features (vision_output_dim = width x (1 + 2)).

Weights: as the other builders (common.scaled_std), and the cross-attention gates (tanh-gated, zero
at init in transformers, so a fresh model ignores images) at 1, so that images change the output.
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "mllama"

# Llama 3's special tokens that the 3.2 Vision processor and chat template use; <|image|> is the
# image token, <|eot_id|> ends a turn (a stop token with <|end_of_text|>).
MLLAMA_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>")

# The layout of meta-llama/Llama-3.2-11B-Vision-Instruct's template without its system prompt and
# tool sections: each turn's header, its parts in order (an image part is <|image|>), <|eot_id|>.
MLLAMA_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
    "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

_MLLAMA_SIZES = common.sizes(
    tiny=dict(layers=4, cross_attention_layers=[1, 3], vision_layers=2, global_layers=1, image_size=56,
              intermediate_layers=[0, 1]),
    bench=dict(layers=8, cross_attention_layers=[3, 7], vision_layers=4, global_layers=2, image_size=224,
               intermediate_layers=[1, 3]),
)


def mllama_std(hidden: int) -> common.StdFor:
    """The shared recipe, plus: the tower's class embedding and gated position tables are vectors and
    tables that are not norms (std 1 / 0.1), and the tanh gates at 1 so cross-attention matters."""
    return common.scaled_std(
        hidden,
        fixed={"class_embedding": 1.0, ("gate", "cross_attn_attn_gate", "cross_attn_mlp_gate"): 1.0,
               ("embedding", "tile_embedding.weight"): 0.1},
        gains={("q_proj.weight", "k_proj.weight"): 2.0, "multi_modal_projector.weight": 2.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    p = _MLLAMA_SIZES[ctx.size]
    vocab = common.train_vocab(ctx.seed, MLLAMA_SPECIAL_TOKENS, bos="<|begin_of_text|>",
                               pad="<|finetune_right_pad_id|>", stop=("<|eot_id|>", "<|end_of_text|>"))
    image_token_id = vocab.ids["<|image|>"]
    text_config = common.text_config(p, vocab, model_type="mllama_text_model", max_position_embeddings=4096,
                                     rms_norm_eps=1e-5, cross_attention_layers=p["cross_attention_layers"])
    vision_config = dict(hidden_size=p["vision_hidden"], intermediate_size=p["vision_intermediate"],
                         num_hidden_layers=p["vision_layers"], num_global_layers=p["global_layers"],
                         attention_heads=p["vision_heads"], image_size=p["image_size"], patch_size=14,
                         max_num_tiles=4, intermediate_layers_indices=p["intermediate_layers"],
                         vision_output_dim=p["vision_hidden"] * (1 + len(p["intermediate_layers"])))
    config = MllamaConfig(text_config=text_config, vision_config=vision_config, image_token_index=image_token_id,
                          dtype="float32")
    model = common.random_model(MllamaForConditionalGeneration, config, ctx.seed, mllama_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)

    size = p["image_size"]
    image_processor = MllamaImageProcessor(size={"height": size, "width": size}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=vocab.tokenizer,
                                chat_template=MLLAMA_CHAT_TEMPLATE)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
