"""PaddleOCR-VL (PaddleOCRVLForConditionalGeneration): Qwen2-VL's split (qwen2_vl.py) for images only.

PaddleOCRVLModel has Qwen2-VL's model API: `get_image_features(pixel_values, image_grid_thw)` returns one
merged (2x2) row block per image, and `get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, ...)`
its mRoPE positions and rope delta by Qwen2-VL's rules. What differs: its processor keeps each patch as a
small image ([patches, channels, patch, patch], no temporal axis flattened in), its placeholder token is
the tokenizer's `image_token` (the released checkpoint's <|IMAGE_PLACEHOLDER|>), whose id the config
names, and it takes no video.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase, ProcessorMixin

from services.models.base import IMAGE, ProcessedItem
from services.models.inputs import ItemSchema, TensorSpec
from services.models.qwen2_vl import Qwen2VL


class PaddleOcrVl(Qwen2VL):
    name = "paddleocr_vl"
    hf_architectures = ("PaddleOCRVLForConditionalGeneration",)
    modalities = (IMAGE,)
    supports_video_pruning = False

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|IMAGE_PLACEHOLDER|>"}[modality]

    def placeholder_token_id(self, tokenizer: PreTrainedTokenizerBase, modality: str) -> int:
        # The config's id, the one the model scatters image rows into (a checkpoint's tokenizer spells the
        # token as its processor's tokenizer.image_token says).
        return {IMAGE: self.config.image_token_id}[modality]

    def _items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], modality: str,
               count: int) -> list[ProcessedItem]:
        return super()._items(processor, out, token_ids, modality, count) if modality in self.modalities else []

    def encoder_schema(self, modality: str) -> ItemSchema:
        vision = self.config.vision_config
        channels = getattr(vision, "num_channels", 3)
        pixels = TensorSpec("pixel_values", ("t*h*w", channels, vision.patch_size, vision.patch_size))
        return ItemSchema(tensors=(pixels, self._grid(modality)), patches="t*h*w", derive=self._tokens)
