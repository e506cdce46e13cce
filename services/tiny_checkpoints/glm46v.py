"""Tiny random GLM-4.6V checkpoints (Glm46VForConditionalGeneration).

GLM-4.1V's model under another name (glm4v.py builds its pieces): its language model and tower are
built from their own configs' model types (here glm4v_text and glm4v_vision, as GLM-4.6V-Flash), and
its processor writes a video frame's timestamp with one decimal.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.glm4v import build_glm_v

FAMILY = "glm46v"


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Glm46VConfig,
        Glm46VForConditionalGeneration,
        Glm46VImageProcessor,
        Glm46VProcessor,
        Glm46VVideoProcessor,
    )

    build_glm_v(ctx, Glm46VConfig, Glm46VForConditionalGeneration,
                (Glm46VProcessor, Glm46VImageProcessor, Glm46VVideoProcessor),
                text_keys={"model_type": "glm4v_text"}, vision_keys={"model_type": "glm4v_vision"})
