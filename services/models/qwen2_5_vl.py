"""Qwen2.5-VL: Qwen2-VL's processor, placeholders and mRoPE, with a windowed vision tower.

The tower attends within windows of `window_size` pixels in every block except
`fullatt_block_indexes`, reordering patches by window inside `visual.forward`. Both are
internal to the tower: `get_image_features` returns the merged rows in the processor's patch
order, one row per placeholder token, so encoding and merging are Qwen2-VL's. Items batched
together stay independent: windows never cross images (cu_window_seqlens restarts per image).
Videos would also need `second_per_grid_ts` among their position inputs; only images are served.
"""

from __future__ import annotations

from services.models.base import IMAGE
from services.models.qwen2_vl import Qwen2VL


class Qwen2_5_VL(Qwen2VL):
    name = "qwen2_5_vl"
    hf_architectures = ("Qwen2_5_VLForConditionalGeneration",)
    modalities = (IMAGE,)  # video: Qwen2-VL's path lacks second_per_grid_ts (2.5) and timestamps (3)
