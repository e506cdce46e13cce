"""GLM-4.6V (Glm46VForConditionalGeneration; also the `glmga` model type, whose config builds the same
class): GLM-4.1V's model with its language model and tower built from their configs' model types.

The split is GLM-4.1V's (glm4v.py): the same placeholders, `get_image_features` and `get_rope_index`
(Glm46VModel copies Glm4vModel's). The language model is whichever AutoModel the text config names,
all taking `inputs_embeds` and 3-axis mRoPE `position_ids`.
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.glm4v import Glm4v


class Glm46V(Glm4v):
    name = "glm46v"
    hf_architectures = ("Glm46VForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
