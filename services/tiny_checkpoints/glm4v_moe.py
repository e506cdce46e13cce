"""Tiny random GLM-4.5V checkpoints (Glm4vMoeForConditionalGeneration).

GLM-4.1V's tower, processor and chat template (glm4v.py builds them) with a GLM-4.5 mixture-of-experts
language model: the first `first_k_dense_replace` layers dense, then a sigmoid router choosing
`num_experts_per_tok` of `n_routed_experts` per token beside an always-on shared expert. Its rotary
half is mRoPE too, laid out in halves (GPT-NeoX) where GLM-4.1V interleaves.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.glm4v import build_glm_v, glm_std
from services.tiny_checkpoints.qwen3_vl_moe import moe_std

FAMILY = "glm4v_moe"

# Routed experts and each one's intermediate size; one shared expert; layer 0 dense, the rest MoE.
_MOE = {"tiny": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64),
        "bench": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=512)}
assert set(_MOE) == set(common.SIZES)


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Glm4vImageProcessor,
        Glm4vMoeConfig,
        Glm4vMoeForConditionalGeneration,
        Glm4vProcessor,
        Glm4vVideoProcessor,
    )

    text_keys = _MOE[ctx.size] | dict(n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1)
    build_glm_v(ctx, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration,
                (Glm4vProcessor, Glm4vImageProcessor, Glm4vVideoProcessor),
                text_keys=text_keys, std=lambda hidden: moe_std(hidden, glm_std(hidden)))
