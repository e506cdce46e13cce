"""Tiny random Qwen3-VL-MoE checkpoints (Qwen3VLMoeForConditionalGeneration).

Qwen3-VL's tower, deepstack, processor and chat template (qwen3_vl.py builds them); the language
model's MLPs are sparse mixture-of-experts blocks: a softmax router picks `num_experts_per_tok` of
`num_experts` per token and mixes their outputs by the renormalised router weights.
"""

from __future__ import annotations

import math

import torch

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen3_vl import build_qwen3_vl, qwen3_vl_std

FAMILY = "qwen3_vl_moe"

# Experts per MoE block, routed per token, and each expert's intermediate size.
_MOE = {"tiny": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
        "bench": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)}
assert set(_MOE) == set(common.SIZES)


def moe_std(hidden: int, dense: common.StdFor) -> common.StdFor:
    """`dense`'s std, and for the experts' stacked weights [experts, out, in] the variance-preserving std
    of one expert's matrix (1/sqrt(in)): common.fan_in would count all experts' columns."""

    def std_for(name: str, param: torch.Tensor) -> float | None:
        if param.ndim == 3 and ".experts." in name:
            return 1.0 / math.sqrt(param.shape[-1])
        return dense(name, param)

    return std_for


def build(ctx: common.BuildContext) -> None:
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    build_qwen3_vl(ctx, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, text_keys=_MOE[ctx.size],
                   std=lambda hidden: moe_std(hidden, qwen3_vl_std(hidden)))
