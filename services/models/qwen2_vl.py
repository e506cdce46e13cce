"""Qwen2-VL: variable patches per image (grid_thw), merged 2x2, and mRoPE positions."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, ModelFamily, PlacedEmbeddings, PrefillInputs, ProcessedItem, ProcessedPrompt

# mm_token_type_ids values that get_rope_index expects
_TOKEN_TYPE = {IMAGE: 1, VIDEO: 2}


class Qwen2VL(ModelFamily):
    name = "qwen2_vl"
    hf_architectures = ("Qwen2VLForConditionalGeneration",)
    modalities = (IMAGE,)

    @property
    def spatial_merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image_pad|>", VIDEO: "<|video_pad|>"}[modality]

    def num_placeholder_tokens(self, grid_thw: torch.Tensor) -> int:
        t, h, w = (int(x) for x in grid_thw)  # patches along time, height, width
        return t * h * w // self.spatial_merge_size**2

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        items: list[ProcessedItem] = []
        if images:
            grids = out["image_grid_thw"]  # [num_images, 3]
            self.check_counts("images", [self.num_placeholder_tokens(g) for g in grids], [n for _, n in runs])
            patch_start = 0
            for (offset, length), grid in zip(runs, grids):
                num_patches = int(grid.prod())
                items.append(ProcessedItem(
                    modality=IMAGE, offset=offset, length=length,
                    encoder_inputs={
                        "pixel_values": out["pixel_values"][patch_start : patch_start + num_patches],
                        "image_grid_thw": grid[None],
                    },
                    position_inputs={"image_grid_thw": grid[None]},
                ))
                patch_start += num_patches
        else:
            self.check_counts("images", [], [n for _, n in runs])
        return ProcessedPrompt(token_ids=token_ids, items=items)

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        device = model.device
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(device)
        grid_thw = torch.cat([it["image_grid_thw"] for it in items]).to(device)
        out = model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)
        return [ItemEmbeddings(embeddings=e) for e in out.pooler_output]

    def _grid_of(self, item: PlacedEmbeddings) -> torch.Tensor:
        """The item's grid_thw, checked against its placeholder length (positions depend on it)."""
        name = f"{item.modality}_grid_thw"
        grid = item.position_inputs.get(name)
        if grid is None or tuple(grid.shape) != (1, 3) or grid.is_floating_point():
            raise InvalidArgument(
                f"{item.modality} at offset {item.offset} needs position input {name!r}, integer shape [1, 3]",
                reason="POSITION_INPUT_INVALID",
            )
        if self.num_placeholder_tokens(grid[0]) != item.length:
            raise InvalidArgument(
                f"{name} {grid[0].tolist()} means {self.num_placeholder_tokens(grid[0])} tokens, "
                f"the placeholder range has {item.length}",
                reason="POSITION_INPUT_INVALID",
            )
        return grid.long()

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        prefill = super().prefill_inputs(model, token_ids, placed)
        if not placed:
            return prefill  # text only: plain 1-D positions, as transformers uses
        token_types = torch.zeros_like(token_ids)
        grids: dict[str, list[torch.Tensor]] = {IMAGE: [], VIDEO: []}
        for item in placed:
            token_types[item.offset : item.offset + item.length] = _TOKEN_TYPE[item.modality]
            grids[item.modality].append(self._grid_of(item))
        position_ids, rope_deltas = model.model.get_rope_index(
            token_ids[None],
            mm_token_type_ids=token_types[None],
            image_grid_thw=torch.cat(grids[IMAGE]) if grids[IMAGE] else None,
            video_grid_thw=torch.cat(grids[VIDEO]) if grids[VIDEO] else None,
        )  # [3, 1, L], [1, 1]
        prefill.position_ids = position_ids
        prefill.rope_delta = int(rope_deltas[0, 0])
        return prefill
