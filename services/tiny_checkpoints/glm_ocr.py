"""Tiny random GLM-OCR checkpoints (GlmOcrForConditionalGeneration).

GLM-4.1V's pieces (glm4v.py) with GLM-OCR's configs (model types glm_ocr_text and glm_ocr_vision) and
GLM-4.6V's processor, which the released zai-org/GLM-OCR checkpoint names.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.glm4v import build_glm_v

FAMILY = "glm_ocr"


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Glm46VImageProcessor,
        Glm46VProcessor,
        Glm46VVideoProcessor,
        GlmOcrConfig,
        GlmOcrForConditionalGeneration,
    )

    build_glm_v(ctx, GlmOcrConfig, GlmOcrForConditionalGeneration,
                (Glm46VProcessor, Glm46VImageProcessor, Glm46VVideoProcessor))
