"""Qwen3.5-MoE (Qwen3_5MoeForConditionalGeneration): Qwen3.5 (qwen3_5.py) with mixture-of-experts MLPs.

Routing is per token inside each decoder layer and the cache is Qwen3.5's (linear-attention state and
KV by layer type), so the services see Qwen3.5's model.
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.qwen3_5 import Qwen3_5


class Qwen3_5Moe(Qwen3_5):
    name = "qwen3_5_moe"
    hf_architectures = ("Qwen3_5MoeForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
