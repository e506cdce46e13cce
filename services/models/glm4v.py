"""GLM-4.1V (Glm4vForConditionalGeneration): Qwen2-VL's split with GLM's tokens and tower.

What the services see is Qwen2-VL's: patches per image with `image_grid_thw`, one `<|image|>` run of
t*h*w/4 tokens per image, merged rows from `get_image_features` (a 2x2 conv and gated MLP inside the
tower), and mRoPE positions from the model's own `get_rope_index`, which has Qwen2-VL's signature and
rules (an image advances the text position by max(h, w)/2; decode continues at cache length + delta).
The language model applies them to the rotary half of each head (partial rotary), inside the model.

Images only: a GLM-V video is one `<|image|>` run per frame group, each followed by its timestamp in
text and told apart from images only by the `<|begin_of_video|>` around them; not served here.
"""

from __future__ import annotations

from services.models.base import IMAGE, VIDEO
from services.models.qwen2_vl import Qwen2VL


class Glm4v(Qwen2VL):
    name = "glm4v"
    hf_architectures = ("Glm4vForConditionalGeneration",)
    modalities = (IMAGE,)
    supports_video_pruning = False

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image|>", VIDEO: "<|video|>"}[modality]
