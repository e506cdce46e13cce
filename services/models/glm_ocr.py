"""GLM-OCR (GlmOcrForConditionalGeneration): GLM-4.1V's model with a smaller tower whose MLP and attention
take their own sizes, and a GLM-4 language model of its own model type.

GlmOcrModel subclasses Glm4vModel without changing `get_image_features`, `get_video_features` or
`get_rope_index`, and its checkpoints ship GLM-4.6V's processor, so the split is GLM-4.1V's (glm4v.py).
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.glm4v import Glm4v


class GlmOcr(Glm4v):
    name = "glm_ocr"
    hf_architectures = ("GlmOcrForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
