"""InternVL (transformers' native port, model_type "internvl"): images cut into tiles, each tile
pixel-shuffled to a fixed number of tokens, and a plain decoder (Qwen2/Qwen3/Llama) language model.

The processor (GotOcr2ImageProcessor with crop_to_patches) picks each image's tile grid from its
aspect ratio (plus a thumbnail when there is more than one tile) and expands the prompt's
`<IMG_CONTEXT>` to `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`. It returns all
tiles of all images stacked in prompt order and no per-image tile count, so each image's count is
read back from its placeholder run: run length / image_seq_length.

The whole model merges the tower's rows over the `<IMG_CONTEXT>` tokens (masked_scatter, tile by
tile) and runs the language model with 1-D positions and a causal mask: the base class's defaults.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.models.base import IMAGE, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items


class InternVL(ModelFamily):
    name = "internvl"
    hf_architectures = ("InternVLForConditionalGeneration",)
    modalities = (IMAGE,)
    # Fixed-size tiles stacked on the batch dim; no op mixes them.
    encoder_batching = "exact"

    @property
    def tokens_per_tile(self) -> int:
        return self.config.image_seq_length

    @property
    def tile_size(self) -> tuple[int, int]:
        height, width = self.config.vision_config.image_size
        return height, width

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<IMG_CONTEXT>"}[modality]

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        if processor.image_seq_length != self.tokens_per_tile:
            raise InvalidArgument(
                f"the processor expands a tile to {processor.image_seq_length} tokens, the model's "
                f"image_seq_length is {self.tokens_per_tile}; fix processor_config.json",
                reason="PROCESSOR_CONFIG_MISMATCH")
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        if not images:
            self.check_counts("images", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=[])
        if len(runs) != len(images) or any(n % self.tokens_per_tile for _, n in runs):
            raise InvalidArgument(
                f"{len(images)} images but placeholder runs of {[n for _, n in runs]} tokens; each image "
                f"needs one run of a multiple of {self.tokens_per_tile} tokens (one per tile)",
                reason="PLACEHOLDER_COUNT_MISMATCH")
        pixel_values = out["pixel_values"]  # [total tiles, 3, H, W], images in prompt order
        num_tiles = [n // self.tokens_per_tile for _, n in runs]
        if sum(num_tiles) != pixel_values.shape[0]:
            raise InvalidArgument(
                f"the placeholder runs need {num_tiles} tiles ({sum(num_tiles)} in all), the processor "
                f"made {pixel_values.shape[0]}", reason="PLACEHOLDER_COUNT_MISMATCH")
        inputs = split_items(out, {"pixel_values": Split.flat("tiles")}, len(images), sizes={"tiles": num_tiles})
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for (offset, length), item_inputs in zip(runs, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        height, width = self.tile_size
        patch_height, patch_width = self.config.vision_config.patch_size
        patches_per_tile = (height // patch_height) * (width // patch_width)
        return ItemSchema(tensors=(TensorSpec("pixel_values", ("tiles", 3, height, width)),),
                          patches=f"tiles*{patches_per_tile}",
                          derive=lambda item, bindings: {"tokens": bindings["tiles"] * self.tokens_per_tile})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        num_tiles = [it["pixel_values"].shape[0] for it in items]
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(model.device)  # [T, 3, H, W]
        # vision_feature_layer / vision_feature_select_strategy default to the config's, as in forward
        out = model.model.get_image_features(pixel_values=pixel_values)
        features = out.pooler_output  # [T, image_seq_length, hidden]
        hidden = features.shape[-1]
        return [ItemEmbeddings(embeddings=f.reshape(-1, hidden)) for f in features.split(num_tiles)]
