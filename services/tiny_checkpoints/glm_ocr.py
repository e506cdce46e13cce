"""Tiny random GLM-OCR checkpoints (GlmOcrForConditionalGeneration).

GLM-4.1V's pieces (glm4v.py) with GLM-OCR's configs (model types glm_ocr_text and glm_ocr_vision) and
GLM-4.6V's processor, which the released zai-org/GLM-OCR checkpoint names.
"""

from __future__ import annotations

from services.tiny_checkpoints import common
from services.tiny_checkpoints.glm4v import (
    GLM_SIZES,
    finish_glm,
    glm_processor,
    glm_std,
    glm_text_config,
    glm_token_kwargs,
    glm_vision_config,
    glm_vocab,
)

FAMILY = "glm_ocr"


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Glm46VImageProcessor,
        Glm46VProcessor,
        Glm46VVideoProcessor,
        GlmOcrConfig,
        GlmOcrForConditionalGeneration,
    )

    p = GLM_SIZES[ctx.size]
    vocab = glm_vocab(ctx.seed)
    config = GlmOcrConfig(text_config=glm_text_config(p, vocab), vision_config=glm_vision_config(p),
                          **glm_token_kwargs(vocab))
    model = common.random_model(GlmOcrForConditionalGeneration, config, ctx.seed, glm_std(p["hidden"]))
    processor = glm_processor(Glm46VProcessor, Glm46VImageProcessor, Glm46VVideoProcessor, vocab, p)
    finish_glm(ctx, model, processor, vocab)
