"""Tiny random Qwen3.5-MoE checkpoints (Qwen3_5MoeForConditionalGeneration).

Qwen3.5's hybrid language model and Qwen3-VL's tower without deepstack (qwen3_5.py), with every MLP a
mixture of experts: a softmax router picks `num_experts_per_tok` of `num_experts` per token, beside a
shared expert whose output a sigmoid gate scales.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.qwen3_5 import text_keys
from services.tiny_checkpoints.qwen3_vl import build_qwen3_vl
from services.tiny_checkpoints.qwen3_vl_moe import moe_std, qwen3_vl_std

FAMILY = "qwen3_5_moe"

# Experts per MoE block and each one's intermediate size; the shared expert's intermediate size.
_MOE = {
    "tiny": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
             "shared_expert_intermediate_size": 64},
    "bench": {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 512,
              "shared_expert_intermediate_size": 512},
}
assert set(_MOE) == set(common.SIZES)


def build(ctx: common.BuildContext) -> None:
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    build_qwen3_vl(ctx, Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration,
                   text_keys=text_keys(ctx.size, **_MOE[ctx.size]), vision_keys={"deepstack_visual_indexes": None},
                   std=lambda hidden: moe_std(hidden, qwen3_vl_std(hidden)))
