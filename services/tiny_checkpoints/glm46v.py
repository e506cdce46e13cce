"""Tiny random GLM-4.6V checkpoints (Glm46VForConditionalGeneration).

GLM-4.1V's model under another name (glm4v.py builds its pieces): its language model and tower are
built from their own configs' model types (here glm4v_text and glm4v_vision, as GLM-4.6V-Flash), and
its processor writes a video frame's timestamp with one decimal.
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

FAMILY = "glm46v"


def build(ctx: common.BuildContext) -> None:
    from transformers import (
        Glm46VConfig,
        Glm46VForConditionalGeneration,
        Glm46VImageProcessor,
        Glm46VProcessor,
        Glm46VVideoProcessor,
    )

    p = GLM_SIZES[ctx.size]
    vocab = glm_vocab(ctx.seed)
    config = Glm46VConfig(text_config=glm_text_config(p, vocab, model_type="glm4v_text"),
                          vision_config={**glm_vision_config(p), "model_type": "glm4v_vision"},
                          **glm_token_kwargs(vocab))
    model = common.random_model(Glm46VForConditionalGeneration, config, ctx.seed, glm_std(p["hidden"]))
    processor = glm_processor(Glm46VProcessor, Glm46VImageProcessor, Glm46VVideoProcessor, vocab, p)
    finish_glm(ctx, model, processor, vocab)
