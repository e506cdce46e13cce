"""Qwen3-VL-MoE: Qwen3-VL (tower, deepstack, mRoPE, timestamped video runs) with a mixture-of-experts
language model.

The experts change nothing the services see: routing is per token inside each decoder layer, the
cache is Qwen3-VL's KV cache, and the language model takes the same `visual_pos_masks` and
`deepstack_visual_embeds` (Qwen3VLMoeTextModel.forward). So the family is Qwen3-VL's, under another
architecture.
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.qwen3_vl import Qwen3VL


class Qwen3VLMoe(Qwen3VL):
    name = "qwen3_vl_moe"
    hf_architectures = ("Qwen3VLMoeForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
