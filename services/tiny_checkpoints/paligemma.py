"""Tiny random PaliGemma 2 checkpoints (PaliGemmaForConditionalGeneration: SigLIP tower + Gemma 2 text model).

PaliGemma 2 (google/paligemma2-3b-pt-224) resizes every image to one square (224 px, SigLIP patch 14:
256 tokens), projects each patch with one linear layer, and runs the prompt as a prefix LM: the
images and the prefix text attend to each other both ways. The tiny one keeps that at 32 px, patch 8
(16 tokens per image), and keeps what makes the Gemma 2 text model different from a plain decoder:
embeddings scaled by sqrt(hidden), (1 + w) RMS norms before and after attention and MLP, sliding-
window layers beside full ones (a small window, so it really cuts the prompts of the tests),
attention-logit and final-logit softcapping. Word embeddings are tied to lm_head, as the real ones.
"""

from __future__ import annotations

import torch

from services.models.paligemma import PALIGEMMA_CHAT_TEMPLATE
from services.tiny_checkpoints import common
from services.tiny_checkpoints.gemma3 import _gemma3_std

FAMILY = "paligemma"

# PaliGemma's special tokens (the real ids: <pad> 0, <eos> 1, <bos> 2, <unk> 3, <image> 257152 - 1024
# - 128 = 256000); here their ids follow the BPE vocabulary in this order. The processor adds the
# 1024 <locNNNN> and 128 <segNNN> tokens after them, as the real vocabulary has them.
PALIGEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<image>")

# See gemma3's: tied weights cannot zero the special rows, so they are made small.
_SPECIAL_ROW_SCALE = 0.3

# The shared text and tower (SigLIP) shapes, plus the text head_dim and sliding window (tokens), the
# softcaps of paligemma2 (attention 50, final 30), the (1 + w) post-norm weights, the image size and patch.
_PALIGEMMA_SIZES = common.sizes(
    tiny=dict(head_dim=16, sliding_window=16, post_norm=1.0, image_size=32, patch=8),
    bench=dict(layers=6, head_dim=64, sliding_window=128, post_norm=3.0, image_size=224, patch=14),
)


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    p = _PALIGEMMA_SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        PALIGEMMA_SPECIAL_TOKENS,
        bos="<bos>",
        pad="<pad>",
        stop=("<eos>",),
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},  # what PaliGemmaProcessor reads from the tokenizer
        model_max_length=8192,
    )
    size = p["image_size"]
    tokens_per_image = (size // p["patch"]) ** 2
    image_processor = SiglipImageProcessor(  # paligemma2-*-224: 224x224, bicubic, mean/std 0.5
        size={"height": size, "width": size}, resample=3, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    image_processor.image_seq_length = tokens_per_image
    # First: the processor adds the <loc>/<seg> tokens to the tokenizer, which the model's vocabulary covers.
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=vocab.tokenizer,
                                   chat_template=PALIGEMMA_CHAT_TEMPLATE)

    config = PaliGemmaConfig(
        text_config=common.text_config(
            p,
            vocab,
            model_type="gemma2",
            head_dim=p["head_dim"],
            query_pre_attn_scalar=p["head_dim"],
            sliding_window=p["sliding_window"],
            # paligemma2: sliding and full layers alternate, starting with a sliding one
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(p["layers"])],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
            max_position_embeddings=8192,
        ),
        vision_config=common.vision_tower_config(
            p, model_type="siglip_vision_model", image_size=size, patch_size=p["patch"], vision_use_head=False,
            layer_norm_eps=1e-6,
        ),
        projection_dim=p["hidden"],
        hidden_size=p["hidden"],
        image_token_index=vocab.ids["<image>"],
        vocab_size=common.padded_vocab_size(vocab.tokenizer),
        tie_word_embeddings=True,
        dtype="float32",
    )
    model = common.random_model(PaliGemmaForConditionalGeneration, config, ctx.seed, _gemma3_std(p["vision_hidden"]))
    text = model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            # As gemma3's: what attention and MLP add comes out of these norms at RMS (1 + w), so that it
            # outweighs the token's own embedding and the tied head does not read back the last input.
            layer.post_attention_layernorm.weight.fill_(p["post_norm"])
            layer.post_feedforward_layernorm.weight.fill_(p["post_norm"])
        text.norm.weight.fill_(2.0)  # logits of std ~3 through the tied head (see gemma3's)
    common.quiet_tied_rows(text.embed_tokens.weight, vocab, _SPECIAL_ROW_SCALE)
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
