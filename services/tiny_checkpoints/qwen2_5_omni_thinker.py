"""Tiny random Qwen2.5-Omni thinker checkpoints (Qwen2_5OmniThinkerForConditionalGeneration).

The thinker is Qwen2.5-Omni's text generator: a Qwen2.5-VL-style windowed vision tower, a Whisper-
style audio tower that encodes each clip in 2 s chunks (n_window 100 frames a side), and a Qwen2
language model with mRoPE. The talker and the vocoder (speech out) are not part of it. The audio
tower's learned width and the vision tower are small; the feature extractor is the real one
(128-bin Whisper, clips padded to 30 s).
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen2_vl import QWEN2_TEXT_SIZES, qwen2_text_config

FAMILY = "qwen2_5_omni_thinker"

# Qwen2.5-Omni's added tokens, in the order of the real tokenizer (ids follow the BPE vocabulary).
QWEN2_5_OMNI_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>", "<|IMAGE|>", "<|VIDEO|>",
)  # fmt: skip

# Qwen2_5OmniProcessor reads these roles from its tokenizer.
_TOKEN_ROLES = {"image_token": "<|IMAGE|>", "audio_token": "<|AUDIO|>", "video_token": "<|VIDEO|>",
                "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
                "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}

# The chat template of Qwen/Qwen2.5-Omni-7B, with a short default system prompt: each image as
# <|vision_bos|><|IMAGE|><|vision_eos|>, each clip as <|audio_bos|><|AUDIO|><|audio_eos|> (the processor
# expands the middle token to the item's count; get_rope_index expects the bos/eos around it).
QWEN2_5_OMNI_CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "{% if add_audio_id %}Audio {{ audio_count.value }}: {% endif %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The text model and image token budgets are Qwen2-VL's (QWEN2_TEXT_SIZES); the vision tower is
# Qwen2.5-VL's tiny one (56 px windows: the tests' small images span several); the audio tower's shape.
_TOWER_SIZES: dict[str, dict] = {
    "tiny": dict(vision_depth=4, vision_embed=32, vision_heads=2, vision_intermediate=64, window_size=56,
                 fullatt_block_indexes=[1, 3], audio_d_model=32, audio_layers=2, audio_heads=2, audio_ffn=64),
    "bench": dict(vision_depth=8, vision_embed=256, vision_heads=4, vision_intermediate=512, window_size=112,
                  fullatt_block_indexes=[3, 7], audio_d_model=256, audio_layers=4, audio_heads=4, audio_ffn=1024),
}
assert set(_TOWER_SIZES) == set(common.SIZES)
_MEL_BINS = 128


def _omni_std(hidden: int) -> common.StdFor:
    """As Qwen2-VL's (qwen2_vl.qwen2_vl_std), with the names of the thinker's towers: q/k twice the
    variance-preserving std everywhere (the vision tower's are `attn.q` / `attn.k`), the image merger's
    and the audio tower's output projections at twice the token embeddings' scale, the audio tower's
    learned bos/eos rows at 1."""
    return common.scaled_std(
        hidden,
        fixed={"audio_bos_eos_token.weight": 1.0},
        gains={("q_proj.weight", "k_proj.weight", "attn.q.weight", "attn.k.weight"): 2.0,
               ("merger.mlp.2.weight", "audio_tower.proj.weight"): 2.0},
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Qwen2_5OmniProcessor,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniThinkerForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    p = {**QWEN2_TEXT_SIZES[ctx.size], **_TOWER_SIZES[ctx.size]}
    vocab = common.train_vocab(ctx.seed, QWEN2_5_OMNI_SPECIAL_TOKENS, bos="<|endoftext|>", pad="<|endoftext|>",
                               stop=("<|im_end|>", "<|endoftext|>"), bos_token=None, model_max_length=32768,
                               extra_special_tokens=_TOKEN_ROLES)
    ids = vocab.ids
    config = Qwen2_5OmniThinkerConfig(
        text_config={**qwen2_text_config(p, vocab), "tie_word_embeddings": False},
        vision_config=dict(
            depth=p["vision_depth"], hidden_size=p["vision_embed"], intermediate_size=p["vision_intermediate"],
            num_heads=p["vision_heads"], out_hidden_size=p["hidden"], patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, window_size=p["window_size"], fullatt_block_indexes=p["fullatt_block_indexes"],
        ),
        audio_config=dict(
            d_model=p["audio_d_model"], encoder_layers=p["audio_layers"], encoder_attention_heads=p["audio_heads"],
            encoder_ffn_dim=p["audio_ffn"], num_mel_bins=_MEL_BINS, output_dim=p["hidden"],
        ),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
        tie_word_embeddings=False,
    )
    model = common.random_model(Qwen2_5OmniThinkerForConditionalGeneration, config, ctx.seed, _omni_std(p["hidden"]))
    common.silence_lm_head_rows(model.lm_head.weight, vocab)
    px = (14 * 2) ** 2  # pixels per merged token
    processor = Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": p["min_tokens"] * px, "longest_edge": p["max_tokens"] * px},
            patch_size=14, temporal_patch_size=2, merge_size=2),
        video_processor=Qwen2VLVideoProcessor(
            size={"shortest_edge": p["video_min_tokens"] * px, "longest_edge": p["video_max_tokens"] * px},
            patch_size=14, temporal_patch_size=2, merge_size=2),
        feature_extractor=WhisperFeatureExtractor(feature_size=_MEL_BINS),
        tokenizer=vocab.tokenizer,
        chat_template=QWEN2_5_OMNI_CHAT_TEMPLATE,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
