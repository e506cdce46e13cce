"""Tiny random Qwen3.5 checkpoints (Qwen3_5ForConditionalGeneration).

Qwen3-VL's tower without deepstack, its processor and image placeholders (qwen3_vl.py builds them;
the chat template is Qwen3-VL's, which renders media as Qwen3.5's does), and a hybrid language model:
`layer_types` mixes Gated DeltaNet linear-attention layers (a causal conv and a recurrent state per
layer, no KV) with gated full-attention layers whose rotary part (`partial_rotary_factor` of each head)
is interleaved mRoPE.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen3_vl import build_qwen3_vl
from services.tiny_checkpoints.qwen3_vl_moe import moe_std, qwen3_vl_std

FAMILY = "qwen3_5"

# Per size: one full-attention layer after each run of linear ones (as released: 3 linear, 1 full);
# head_dim, half of it rotary (released: a quarter of 256), its head_dim/4 frequencies split (T, H, W) by
# mrope_section, interleaved (so H and W each need 3 * section <= head_dim/4); the linear layers' heads.
HYBRID = {
    "tiny": dict(layer_types=["linear_attention", "full_attention"], head_dim=32, mrope_section=[4, 2, 2],
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16),
    "bench": dict(layer_types=["linear_attention"] * 3 + ["full_attention"], head_dim=64, mrope_section=[6, 5, 5],
                  linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32, linear_value_head_dim=32),
}
assert set(HYBRID) == set(common.SIZES)


def text_keys(size: str, **more: object) -> dict:
    """The hybrid language model's config keys of `size` (Qwen3.5-MoE adds its experts in `more`)."""
    h = HYBRID[size]
    return dict(
        layer_types=h["layer_types"],
        num_hidden_layers=len(h["layer_types"]),
        head_dim=h["head_dim"],
        linear_conv_kernel_dim=4,
        **{key: h[key] for key in ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                                   "linear_value_head_dim")},
        rope_parameters={"rope_type": "default", "mrope_section": h["mrope_section"], "mrope_interleaved": True,
                         "rope_theta": 10000000.0, "partial_rotary_factor": 0.5},
        **more,
    )


def build(ctx: common.BuildContext) -> None:
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    build_qwen3_vl(ctx, Qwen3_5Config, Qwen3_5ForConditionalGeneration, text_keys=text_keys(ctx.size),
                   vision_keys={"deepstack_visual_indexes": None},
                   std=lambda hidden: moe_std(hidden, qwen3_vl_std(hidden)))
