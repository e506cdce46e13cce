"""Nemotron-H Omni (NemotronH_Omni_Reasoning_V3): a RADIO tower with pixel shuffle, and a hybrid
Mamba-2 / attention / MoE language model whose cache holds conv and SSM state beside the KV cache.

Images are tiled at dynamic resolution by the image processor: each image becomes a grid of
16 x 16 patches (`image_grid_hw` [h, w], both multiples of 2), flattened to `pixel_values`
rows of 3*16*16 values, all images of a prompt concatenated. The tower pixel-shuffles each
image's grid 2x2, so `<image>` expands to `<img>` + `<image>` x (h*w/4) + `</img>`.

The language model has no rotary positions (position comes from the Mamba layers), so plain
1-D positions and the default merge are what transformers does too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.models.base import IMAGE, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt


class NemotronHOmni(ModelFamily):
    name = "nemotron_h_omni"
    hf_architectures = ("NemotronH_Omni_Reasoning_V3",)
    modalities = (IMAGE,)

    @property
    def merge_size(self) -> int:
        """Patches merged per side by the pixel shuffle (2 for downsample_ratio 0.5)."""
        return round(1 / self.config.downsample_ratio)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x patch x patch (768 for 16-px RGB patches)."""
        return self.config.vision_config.patch_dim

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<image>"}[modality]

    def num_placeholder_tokens(self, grid_hw: torch.Tensor) -> int:
        h, w = (int(x) for x in grid_hw)  # patches along height, width
        return h * w // self.merge_size**2

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        items: list[ProcessedItem] = []
        if not images:
            self.check_counts("images", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=items)
        grids = out["image_grid_hw"]  # [num_images, 2]
        self.check_counts("images", [self.num_placeholder_tokens(g) for g in grids], [n for _, n in runs])
        pixel_values = out["pixel_values"]  # [total_patches, patch_dim], images one after another
        patch_start = 0
        for (offset, length), grid in zip(runs, grids):
            num_patches = int(grid.prod())
            items.append(ProcessedItem(
                modality=IMAGE, offset=offset, length=length,
                encoder_inputs={
                    "pixel_values": pixel_values[patch_start : patch_start + num_patches],
                    "image_grid_hw": grid[None],
                },
            ))
            patch_start += num_patches
        if patch_start != pixel_values.shape[0]:
            raise InvalidArgument(
                f"the image grids cover {patch_start} patches, the processor made {pixel_values.shape[0]}",
                reason="PLACEHOLDER_COUNT_MISMATCH",
            )
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    def _check_item(self, index: int, item: dict[str, torch.Tensor]) -> None:
        """Shapes the tower would otherwise mis-split or reshape silently (pixel shuffle needs even grids)."""
        pixel_values, grid = item.get("pixel_values"), item.get("image_grid_hw")
        if pixel_values is None or grid is None:
            raise InvalidArgument(f"image {index} needs tensors 'pixel_values' and 'image_grid_hw'",
                                  reason="ENCODER_INPUT_INVALID")
        if tuple(grid.shape) != (1, 2) or grid.is_floating_point() or bool((grid <= 0).any()):
            raise InvalidArgument(f"image {index}: image_grid_hw must be positive integers of shape [1, 2], "
                                  f"got {list(grid.shape)} {grid.dtype}", reason="ENCODER_INPUT_INVALID")
        h, w = (int(x) for x in grid[0])
        if h % self.merge_size or w % self.merge_size:
            raise InvalidArgument(f"image {index}: grid {h}x{w} is not a multiple of the {self.merge_size}x"
                                  f"{self.merge_size} pixel shuffle", reason="ENCODER_INPUT_INVALID")
        if tuple(pixel_values.shape) != (h * w, self.patch_dim) or not pixel_values.is_floating_point():
            raise InvalidArgument(f"image {index}: pixel_values of shape {list(pixel_values.shape)}, expected "
                                  f"[{h * w}, {self.patch_dim}] (grid {h}x{w} patches x patch values)",
                                  reason="ENCODER_INPUT_INVALID")

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        for index, item in enumerate(items):
            self._check_item(index, item)
        device = model.device
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(device)  # [total_patches, patch_dim]
        grid_hw = torch.cat([it["image_grid_hw"] for it in items]).to(device).long()  # [num_images, 2]
        # As the model's forward: one packed tower pass (each image attends only to itself),
        # per-image pixel shuffle, projector; pooler_output holds one [h*w/4, hidden] per image.
        out = model.get_image_features(pixel_values=pixel_values, image_grid_hw=grid_hw)
        return [ItemEmbeddings(embeddings=e) for e in out.pooler_output]

    def strip_for_encoder(self, model: PreTrainedModel) -> None:
        model.language_model = None

    # ---- llm ---------------------------------------------------------------------------
    def strip_for_llm(self, model: PreTrainedModel) -> None:
        model.vision_model = None
        model.vision_final_layernorm = None
        model.multi_modal_projector = None
        model.audio_tower = None
        model.embed_audio = None

    def new_cache(self, model: PreTrainedModel) -> Cache:
        """The cache generate() makes for this model: one layer per hybrid block, a conv + SSM state
        layer for each Mamba block, a KV layer for each attention block, none for MoE/MLP blocks.

        Its get_seq_length() reads the first attention layer, so the engine's decode bookkeeping holds.
        """
        return DynamicCache(config=self.config.get_text_config(decoder=True))

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.language_model.model  # NemotronHModel inside NemotronHForCausalLM

    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.language_model.lm_head
