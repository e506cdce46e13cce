"""Qwen2.5-VL: Qwen2-VL's processor, placeholders and mRoPE, with a windowed vision tower.

The tower attends within windows of `window_size` pixels in every block except
`fullatt_block_indexes`, reordering patches by window inside `visual.forward`. Both are
internal to the tower: `get_image_features` returns the merged rows in the processor's patch
order, one row per placeholder token, so encoding and merging are Qwen2-VL's. Items batched
together stay independent: windows never cross images (cu_window_seqlens restarts per image).

Video: Qwen2-VL's, except that the temporal axis of its mRoPE positions is in seconds: a grid step t
advances `tokens_per_second * second_per_grid_ts` positions, where the processor derives
second_per_grid_ts from the sampled frames' fps (temporal_patch_size / sampled fps). It travels with
the video's grid among its position inputs, and get_rope_index receives it as in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
from transformers import ProcessorMixin

from services.models.base import IMAGE, VIDEO, PlacedEmbeddings, ProcessedItem
from services.models.inputs import FLOAT, Bindings, ItemSchema, TensorSpec
from services.models.qwen2_vl import Qwen2VL

SECONDS = "second_per_grid_ts"


class Qwen2_5_VL(Qwen2VL):
    name = "qwen2_5_vl"
    hf_architectures = ("Qwen2_5_VLForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)

    def position_schema(self, modality: str) -> ItemSchema:
        schema = super().position_schema(modality)
        if modality != VIDEO:
            return schema
        seconds = TensorSpec(SECONDS, (1,), FLOAT)  # [1]: seconds per grid step t of this video

        def derive(item: Mapping[str, torch.Tensor], bindings: Bindings) -> Bindings:
            value = float(item[SECONDS][0])
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{SECONDS} is {value}; expected a positive number of seconds per grid step")
            return schema.derive(item, bindings)

        return ItemSchema(tensors=(*schema.tensors, seconds), derive=derive)

    def _items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], modality: str,
               count: int) -> list[ProcessedItem]:
        items = super()._items(processor, out, token_ids, modality, count)
        if modality != VIDEO or not items:
            return items
        seconds = out[SECONDS]  # [videos] float32
        return [replace(item, position_inputs={**item.position_inputs, SECONDS: seconds[i : i + 1]})
                for i, item in enumerate(items)]

    def rope_index_kwargs(self, videos: list[PlacedEmbeddings]) -> dict[str, Any]:
        if not videos:
            return {}
        # float32, as the processor hands it to transformers' generate: the positions quantize t * interval
        return {SECONDS: torch.cat([video.position_inputs[SECONDS] for video in videos]).float()}
