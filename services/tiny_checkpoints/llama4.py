"""Tiny random Llama 4 checkpoints (Llama4ForConditionalGeneration: tiled vision tower with pixel
shuffle, and the Llama 4 MoE text model).

Llama 4 (meta-llama/Llama-4-Scout-17B-16E-Instruct) cuts each image into up to 16 tiles of 336 px
(patch 14) plus a global view when it has more than one, and pixel-shuffles each tile's 576 patches
into 144 tokens. The tiny one keeps that at 32 px tiles (patch 8: 16 patches, 4 tokens per tile) and
up to 4 tiles, and keeps what makes the text model different from a plain decoder: chunked attention
on the RoPE layers (a small chunk, so it really cuts the prompts in tests), NoPE full-attention layers
whose queries are scaled by a position-dependent temperature (a small floor_scale, so it changes
within the prompts), L2 q/k norms, and MoE blocks (a routed expert plus a shared one) on every other
layer. The prompt format is the processor's own chat template (transformers' Llama 4 default).
"""

from __future__ import annotations

from services.tiny_checkpoints import common

FAMILY = "llama4"

LLAMA4_SPECIAL_TOKENS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>", "<|header_start|>", "<|header_end|>",
    "<|eot|>", "<|eom|>", "<|python_start|>", "<|python_end|>", "<|image_start|>", "<|image_end|>", "<|image|>",
    "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>",
)  # fmt: skip

# The shared shapes, plus: text head_dim, MoE sizes, chunk size (tokens), temperature floor_scale,
# the tower's tile size and patch and the number of tiles an image may take.
_LLAMA4_SIZES = common.sizes(
    tiny=dict(layers=4, head_dim=16, experts=4, chunk=16, floor_scale=8, tile=32, patch=8, max_tiles=4),
    bench=dict(layers=6, head_dim=64, experts=4, chunk=128, floor_scale=64, tile=112, patch=14, max_tiles=4),
)


def build(ctx: common.BuildContext) -> None:
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4ImageProcessor, Llama4Processor
    from transformers.models.llama4.processing_llama4 import chat_template

    p = _LLAMA4_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        LLAMA4_SPECIAL_TOKENS,
        bos="<|begin_of_text|>",
        pad="<|finetune_right_pad|>",
        stop=("<|eot|>", "<|end_of_text|>", "<|eom|>"),
        model_max_length=32768,
    )
    vision_out = 2 * p["hidden"]
    config = Llama4Config(
        text_config=common.text_config(
            p,
            vocab,
            head_dim=p["head_dim"],
            intermediate_size_mlp=p["intermediate"],
            num_local_experts=p["experts"],
            num_experts_per_tok=1,
            interleave_moe_layer_step=2,
            no_rope_layer_interval=2,  # layers 1, 3: NoPE, full attention, temperature-tuned
            attention_chunk_size=p["chunk"],
            floor_scale=p["floor_scale"],
            rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
            max_position_embeddings=32768,
        ),
        vision_config=dict(
            hidden_size=p["vision_hidden"], num_hidden_layers=p["vision_layers"],
            num_attention_heads=p["vision_heads"],
            intermediate_size=4 * p["vision_hidden"],  # the pixel-shuffled width (ratio 0.5: 4 x hidden)
            image_size=p["tile"], patch_size=p["patch"], vision_output_dim=vision_out,
            projector_input_dim=vision_out, projector_output_dim=vision_out,
        ),
        boi_token_index=vocab.ids["<|image_start|>"],
        eoi_token_index=vocab.ids["<|image_end|>"],
        image_token_index=vocab.ids["<|patch|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    std_for = common.scaled_std(
        p["hidden"],
        # the untied head under language_model.; the tower's class embedding and position table at 1
        fixed={"lm_head.weight": common.lm_head_std(p["hidden"]),
               ("class_embedding", "positional_embedding_vlm"): 1.0},
        gains={("q_proj.weight", "k_proj.weight"): 2.0},
    )
    model = common.random_model(Llama4ForConditionalGeneration, config, ctx.seed, std_for)
    common.silence_lm_head_rows(model.language_model.lm_head.weight, vocab)

    image_processor = Llama4ImageProcessor(size={"height": p["tile"], "width": p["tile"]}, max_patches=p["max_tiles"])
    processor = Llama4Processor(image_processor=image_processor, tokenizer=vocab.tokenizer, patch_size=p["patch"],
                                chat_template=chat_template)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
