"""InternVL (transformers' native port, model_type "internvl"): images cut into tiles, each tile
pixel-shuffled to a fixed number of tokens, and a plain decoder (Qwen2/Qwen3/Llama) language model.

The processor (GotOcr2ImageProcessor with crop_to_patches) picks each image's tile grid from its
aspect ratio (plus a thumbnail when there is more than one tile) and expands the prompt's
`<IMG_CONTEXT>` to `<img>` + `<IMG_CONTEXT>` x (image_seq_length x tiles) + `</img>`. It returns all
tiles of all images stacked in prompt order and no per-image tile count, so each image's count is
read back from its placeholder run: run length / image_seq_length.

Video: every chosen frame is resized to one tile (InternVLVideoProcessor) and the prompt's `<video>`
becomes one line per frame, `Frame{i}: <img>` + `<IMG_CONTEXT>` x image_seq_length + `</img>`. The
processor merges the frames into `pixel_values`, between the images' tiles in prompt order, and the
model runs the same tower on them: a video is an item of several placeholder runs (one per frame,
ProcessedItem.runs) whose tiles are its frames.

The whole model merges the tower's rows over the `<IMG_CONTEXT>` tokens (masked_scatter, tile by
tile) and runs the language model with 1-D positions and a causal mask: the base class's defaults.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.common.video import Video
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items


class InternVL(ModelFamily):
    name = "internvl"
    hf_architectures = ("InternVLForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
    # Fixed-size tiles (and frames) stacked on the batch dim; no op mixes them.
    encoder_batching = "exact"

    @property
    def tokens_per_tile(self) -> int:
        return self.config.image_seq_length

    @property
    def tile_size(self) -> tuple[int, int]:
        height, width = self.config.vision_config.image_size
        return height, width

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<IMG_CONTEXT>", VIDEO: "<IMG_CONTEXT>"}[modality]  # a frame is a tile

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   videos: list[Video] = ()) -> ProcessedPrompt:
        if processor.image_seq_length != self.tokens_per_tile:
            raise InvalidArgument(
                f"the processor expands a tile to {processor.image_seq_length} tokens, the model's "
                f"image_seq_length is {self.tokens_per_tile}; fix processor_config.json",
                reason="PROCESSOR_CONFIG_MISMATCH")
        out = processor(text=[text], images=images or None, return_tensors="pt", **self.video_processor_kwargs(videos))
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        # The processor's own order of the media markers, which is its order of their tiles.
        order = [m.lastgroup for m in re.finditer(processor.multimodal_pattern, text)]
        if sorted(order) != sorted([IMAGE] * len(images) + [VIDEO] * len(videos)):
            raise InvalidArgument(f"the prompt has media markers {order} for {len(images)} images and {len(videos)} "
                                  "videos", reason="PLACEHOLDER_COUNT_MISMATCH")
        frames = iter([len(video.frames) for video in videos])
        item_runs = self._item_runs(order, runs, frames)
        if not item_runs:
            return ProcessedPrompt(token_ids=token_ids, items=[])
        pixel_values = out["pixel_values"]  # [total tiles, 3, H, W], images' tiles and videos' frames in prompt order
        num_tiles = [sum(n for _, n in item) // self.tokens_per_tile for _, item in item_runs]
        if sum(num_tiles) != pixel_values.shape[0]:
            raise InvalidArgument(
                f"the placeholder runs need {num_tiles} tiles ({sum(num_tiles)} in all), the processor "
                f"made {pixel_values.shape[0]}", reason="PLACEHOLDER_COUNT_MISMATCH")
        inputs = split_items(out, {"pixel_values": Split.flat("tiles")}, len(item_runs), sizes={"tiles": num_tiles})
        items = [ProcessedItem(modality=modality, offset=item[0][0], length=sum(n for _, n in item),
                               encoder_inputs=item_inputs, runs=tuple(item) if len(item) > 1 else ())
                 for (modality, item), item_inputs in zip(item_runs, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    def _item_runs(self, order: list[str], runs: list[tuple[int, int]], frames: Any
                   ) -> list[tuple[str, list[tuple[int, int]]]]:
        """Each item's placeholder runs, in prompt order: an image's one run of whole tiles, a video's one
        run of one tile per frame."""
        needed = [1 if modality == IMAGE else next(frames) for modality in order]
        if len(runs) != sum(needed):
            raise InvalidArgument(
                f"media {order} with {needed} placeholder runs each, but the prompt has runs of "
                f"{[n for _, n in runs]} tokens", reason="PLACEHOLDER_COUNT_MISMATCH")
        items, start = [], 0
        for modality, count in zip(order, needed):
            item = runs[start : start + count]
            start += count
            per_frame = modality == VIDEO
            if any(n % self.tokens_per_tile or per_frame and n != self.tokens_per_tile for _, n in item):
                raise InvalidArgument(
                    f"{modality} placeholder runs of {[n for _, n in item]} tokens; each must be "
                    f"{'one tile' if per_frame else 'a multiple'} of {self.tokens_per_tile} tokens",
                    reason="PLACEHOLDER_COUNT_MISMATCH")
            items.append((modality, item))
        return items

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        """The same for both modalities: an image's tiles or a video's frames (one tile each)."""
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
        # The whole model runs video frames through get_image_features too (its processor merges them
        # into pixel_values); vision_feature_layer / select strategy default to the config's, as in forward.
        out = model.model.get_image_features(pixel_values=pixel_values)
        features = out.pooler_output  # [T, image_seq_length, hidden]
        hidden = features.shape[-1]
        return [ItemEmbeddings(embeddings=f.reshape(-1, hidden)) for f in features.split(num_tiles)]
