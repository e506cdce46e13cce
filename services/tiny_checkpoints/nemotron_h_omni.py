"""Tiny random Nemotron-H Omni checkpoints (NemotronH_Omni_Reasoning_V3: RADIO tower + hybrid NemotronH LLM).

The language model keeps the family's hybrid shape: Mamba-2 layers (conv + SSM state), one attention
layer and MoE layers (`hybrid_override_pattern` "MEM*E"), so a split that dropped the recurrent
state or mis-ordered it would change the tokens. Video goes through the same RADIO tower (two frames
per temporal patch); audio through a small Parakeet (FastConformer) tower and its projector, from the
processor's 80-bin log-mel features.
"""

from __future__ import annotations

import math

import torch

from services.tiny_checkpoints import common

FAMILY = "nemotron_h_omni"

# The Nemotron tokenizer's control tokens, ChatML turn markers, reasoning tags and the Omni media
# tokens (ids follow the BPE vocabulary here; in the real tokenizer they come first).
_NEMOTRON_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<img>", "</img>", "<image>", "<video>", "<so_start>", "<so_end>", "<so_embedding>",
)  # fmt: skip

# The shape of nvidia/Nemotron-3-Nano-Omni-30B-A3B-Reasoning's chat template without its tool-calling
# branches: an always-present ChatML system turn (empty when the chat has no system message), each
# media item as its bare placeholder (the processor expands <image> to <img><image>...</img>), past
# assistant turns with an empty <think></think> when they carry no reasoning, and the generation
# prompt opening a reasoning block unless enable_thinking=False.
NEMOTRON_H_OMNI_CHAT_TEMPLATE = (
    "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true %}"
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{- '<image>' -}}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{- '<video>' -}}"
    "{%- elif part['type'] == 'audio' or 'audio' in part -%}{{- '<so_embedding>' -}}"
    "{%- elif 'text' in part -%}{{- part['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + render_content(messages[0]['content']) + '<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n<|im_end|>\\n' -}}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set content = render_content(message['content']) -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if '<think>' not in content and '</think>' not in content -%}"
    "{%- set content = '<think></think>' + content -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{%- if enable_thinking -%}{{- '<|im_start|>assistant\\n<think>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n<think></think>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


# text: hidden, hybrid pattern (M mamba, E moe, * attention, - mlp), attention heads, kv heads,
# head_dim, mamba heads x head_dim, groups, state, chunk, experts; vision: RADIO width, depth, heads;
# image: min/max 16-px patches per image (4 patches = 1 token after the 2x2 pixel shuffle);
# audio: Parakeet width, depth, heads, subsampling conv channels, projector width.
_SIZES: dict[str, dict] = {
    "tiny": dict(
        hidden=64, pattern="MEM*E", heads=4, kv_heads=2, head_dim=16, intermediate=128,
        mamba_heads=8, mamba_head_dim=8, mamba_groups=2, ssm_state=16, chunk=16,
        experts=4, experts_per_tok=2, moe_intermediate=64, shared_intermediate=64,
        vision_hidden=32, vision_layers=2, vision_heads=2, projector=64,
        min_patches=16, max_patches=64,  # 4..16 image tokens
        audio_hidden=32, audio_layers=2, audio_heads=2, audio_channels=8, audio_projector=64,
    ),
    "bench": dict(
        hidden=384, pattern="MEM*EMEM*E", heads=6, kv_heads=2, head_dim=64, intermediate=1024,
        mamba_heads=12, mamba_head_dim=64, mamba_groups=2, ssm_state=64, chunk=64,
        experts=8, experts_per_tok=2, moe_intermediate=256, shared_intermediate=256,
        vision_hidden=256, vision_layers=6, vision_heads=4, projector=1024,
        min_patches=64, max_patches=1024,  # 16..256 image tokens
        audio_hidden=256, audio_layers=4, audio_heads=4, audio_channels=64, audio_projector=1024,
    ),
}  # fmt: skip


_MEL_BINS = 80  # the Parakeet feature extractor's log-mel bins, the audio tower's input width


def _std(hidden: int) -> common.StdFor:
    """Per-parameter std, chosen (as for qwen2_vl) so that outputs depend on the prompt and the image.

    Experts are (experts, out, in) tensors: their fan-in is the last dimension. The Mamba constants
    (A_log, D, dt_bias) are set after the draw, as the model's own init does. Not `scaled_std`: the
    lm_head and token embeddings have other names, and the experts another fan-in.
    """

    def std_for(name: str, param: torch.Tensor) -> float | None:
        if name.endswith(("A_log", ".D", "dt_bias")):
            return None  # set by _init_mamba_constants
        if param.ndim == 1:  # norms and layer scales keep ones; biases get a little noise
            return common.vector_std(name)
        if name.endswith("embeddings.weight") and "vision_model" not in name:
            return 1.0  # token embeddings, well separated (RMSNorm rescales them anyway)
        if name == "language_model.lm_head.weight":
            return common.lm_head_std(hidden)
        if name.endswith("position_embedding"):
            return 0.5  # the image's patch positions matter
        if name.endswith("cls_register_token"):
            return 1.0
        if name.endswith(("experts.up_proj", "experts.down_proj")):
            return 1.0 / math.sqrt(param.shape[-1])
        base = common.variance_preserving_std(param)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            return 2.0 * base
        if name.endswith(("multi_modal_projector.linear_2.weight", "embed_audio.linear_2.weight")):
            return 2.0 * base  # media rows as large as token embeddings, so the media change the answer
        return base

    return std_for


def _init_mamba_constants(model: torch.nn.Module, seed: int) -> None:
    """A_log = log(1..H), D = 1 and dt_bias = softplus^-1(dt) with dt log-uniform, as NemotronH inits them."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    gen = torch.Generator().manual_seed(seed + 1)
    text_config = model.config.text_config
    lo, hi = math.log(text_config.time_step_min), math.log(text_config.time_step_max)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NemotronHMamba2Mixer):
                num_heads = module.num_heads
                module.A_log.copy_(torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32)))
                module.D.fill_(1.0)
                dt = torch.exp(torch.rand(num_heads, generator=gen) * (hi - lo) + lo).clamp(min=text_config.time_step_floor)
                module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


def build(ctx: common.BuildContext) -> None:
    from transformers import NemotronH_Omni_Reasoning_V3, NemotronH_Omni_Reasoning_V3_Config, ParakeetFeatureExtractor
    from transformers.models.nemotron_h_omni import (
        NemotronH_Omni_Reasoning_V3ImageProcessor,
        NemotronH_Omni_Reasoning_V3Processor,
        NemotronH_Omni_Reasoning_V3VideoProcessor,
    )

    p = _SIZES[ctx.size]
    vocab = common.train_vocab(
        ctx.seed,
        _NEMOTRON_SPECIAL_TOKENS,
        bos="<s>",
        pad="<unk>",
        stop=("<|im_end|>", "</s>"),
        unk_token="<unk>",
        model_max_length=32768,
    )

    config = NemotronH_Omni_Reasoning_V3_Config(
        # Not common.text_config: the layer count comes from the hybrid pattern.
        text_config=dict(
            vocab_size=common.padded_vocab_size(vocab.tokenizer),
            hidden_size=p["hidden"],
            hybrid_override_pattern=p["pattern"],
            num_attention_heads=p["heads"],
            num_key_value_heads=p["kv_heads"],
            head_dim=p["head_dim"],
            intermediate_size=p["intermediate"],
            mamba_num_heads=p["mamba_heads"],
            mamba_head_dim=p["mamba_head_dim"],
            n_groups=p["mamba_groups"],
            ssm_state_size=p["ssm_state"],
            conv_kernel=4,
            chunk_size=p["chunk"],
            n_routed_experts=p["experts"],
            num_experts_per_tok=p["experts_per_tok"],
            moe_intermediate_size=p["moe_intermediate"],
            moe_shared_expert_intermediate_size=p["shared_intermediate"],
            max_position_embeddings=32768,
            bos_token_id=vocab.bos_id,
            eos_token_id=vocab.stop_ids,
            pad_token_id=vocab.pad_id,
            initializer_range=0.1,  # informative only: weights are re-drawn below
            dtype="float32",
        ),
        vision_config=dict(
            hidden_size=p["vision_hidden"],
            num_hidden_layers=p["vision_layers"],
            num_attention_heads=p["vision_heads"],
            mlp_ratio=2.0,
            patch_size=16,  # 3 x 16 x 16 = 768 values per flattened patch, as the real tower
            max_img_size=256,  # a 16 x 16 position table, interpolated to each image's grid
            num_cls_tokens=2,
            num_registers=1,
            video_temporal_patch_size=2,  # must equal the top-level value (validate_architecture)
            initializer_range=0.1,
            dtype="float32",
        ),
        audio_config=dict(
            hidden_size=p["audio_hidden"],
            num_hidden_layers=p["audio_layers"],
            num_attention_heads=p["audio_heads"],
            intermediate_size=2 * p["audio_hidden"],
            subsampling_factor=8,  # the processor's audio_subsampling_factor: 8 mel frames per token
            subsampling_conv_channels=p["audio_channels"],
            num_mel_bins=_MEL_BINS,
            projection_hidden_size=p["audio_projector"],
            projection_bias=False,
            dtype="float32",
        ),
        downsample_ratio=0.5,
        projector_hidden_size=p["projector"],
        vision_hidden_size=p["vision_hidden"],
        video_temporal_patch_size=2,
        image_token_id=vocab.ids["<image>"],
        video_token_id=vocab.ids["<video>"],
        audio_token_id=vocab.ids["<so_embedding>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    model = common.random_model(NemotronH_Omni_Reasoning_V3, config, ctx.seed, _std(p["hidden"]))
    _init_mamba_constants(model, ctx.seed)
    common.silence_lm_head_rows(model.language_model.lm_head.weight, vocab)

    image_processor = NemotronH_Omni_Reasoning_V3ImageProcessor(
        patch_size=16,
        downsample_ratio=0.5,
        min_num_patches=p["min_patches"],
        max_num_patches=p["max_patches"],
    )
    video_processor = NemotronH_Omni_Reasoning_V3VideoProcessor(
        norm_mean=list(image_processor.image_mean),  # the frames are normalized like images
        norm_std=list(image_processor.image_std),
        patch_size=16,
        downsample_ratio=0.5,
        video_target_num_patches=p["max_patches"],
    )
    processor = NemotronH_Omni_Reasoning_V3Processor(
        image_processor=image_processor,
        video_processor=video_processor,
        tokenizer=vocab.tokenizer,
        feature_extractor=ParakeetFeatureExtractor(feature_size=_MEL_BINS, sampling_rate=16000),
        chat_template=NEMOTRON_H_OMNI_CHAT_TEMPLATE,
        video_temporal_patch_dim=2,
    )
    common.save_checkpoint(ctx.out_dir, model, processor, vocab)
