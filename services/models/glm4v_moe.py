"""GLM-4.5V (Glm4vMoeForConditionalGeneration): GLM-4.1V's split with a mixture-of-experts language model.

Routing is per token inside each decoder layer and the cache is a plain KV cache, so the services see
GLM-4.1V's model (glm4v.py): the same placeholders, tower output and get_rope_index positions.
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.glm4v import Glm4v


class Glm4vMoe(Glm4v):
    name = "glm4v_moe"
    hf_architectures = ("Glm4vMoeForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
