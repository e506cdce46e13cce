"""LLaVA-OneVision: LLaVA-NeXT's anyres images with an "anyres_max_N" cap, and video; SigLIP tower,
Qwen2 language model, plain 1-D positions.

Images: as LLaVA-NeXT (llava_next.py), the base view, then the tiled grid's patches unpadded to the
image's aspect ratio with one image_newline row end per row; then, when that grid holds more than
~N tiles' patches (ratio = sqrt(rows x cols / (N x patches per tile)) > 1.1), the model shrinks it
bilinearly to (rows // ratio) x (cols // ratio) before adding the row ends. The processor service
passes the images as one flat list, which transformers' processor and model treat as one image per
sample (`batch_num_images` all 1): every image is tiled, each on its own (OneVision's multi-image
mode, base view only, needs nested image lists, which a chat request never makes).

Video: every chosen frame is resized to one tile; the tower's patch grid of each frame is pooled
bilinearly to ceil(side / 2)^2 rows, and one image_newline row closes the video:
frames x ceil(side / 2)^2 + 1 `<video>` tokens, one run per video. `get_video_features` takes
[videos, frames, 3, S, S] and returns exactly those rows.

The chat template puts all images, then all videos, with no separator: runs of adjacent items touch,
so each item's count comes from the model's arithmetic (`num_image_tokens`, `num_video_tokens`) and
preprocess checks it against the processor's expansion.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import Internal
from services.common.video import Video
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, ProcessedItem, ProcessedPrompt
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items
from services.models.llava_next import LlavaNext


class LlavaOnevision(LlavaNext):
    name = "llava_onevision"
    hf_architectures = ("LlavaOnevisionForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)

    # ---- sizes -------------------------------------------------------------------------
    @property
    def _max_tiles(self) -> int:
        """N of the config's "anyres_max_N"."""
        return int(self.config.vision_aspect_ratio.removeprefix("anyres_max_"))

    def num_image_tokens(self, height: int, width: int) -> int:
        """Rows that pack_image_features makes of an image of this original size (module docstring)."""
        side = self.tile_size // self.config.vision_config.patch_size  # patches per tile side
        rows, cols = self._grid(height, width)
        grid_h, grid_w = rows * side, cols * side
        if width / height > grid_w / grid_h:  # wider than the grid: padding above and below (unpad_image)
            grid_h -= 2 * ((grid_h - int(round(height * (grid_w / width), 7))) // 2)
        else:
            grid_w -= 2 * ((grid_w - int(round(width * (grid_h / height), 7))) // 2)
        ratio = math.sqrt(grid_h * grid_w / (self._max_tiles * side**2))
        if ratio > 1.1:  # the model's interpolate to [int(h // ratio), int(w // ratio)]
            grid_h, grid_w = int(grid_h // ratio), int(grid_w // ratio)
        return self.tokens_per_tile + grid_h * (grid_w + 1)

    @property
    def tokens_per_frame(self) -> int:
        """A video frame's rows after apply_pooling: the patch grid halved, rounded up."""
        side = self.tile_size // self.config.vision_config.patch_size
        return math.ceil(side / 2) ** 2

    def num_video_tokens(self, frames: int) -> int:
        return frames * self.tokens_per_frame + 1  # + the closing image_newline row

    # ---- processor ---------------------------------------------------------------------
    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<image>", VIDEO: "<video>"}[modality]

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   videos: list[Video] = ()) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt", **self.video_processor_kwargs(videos))
        token_ids = out["input_ids"][0].tolist()
        tokenizer = processor.tokenizer
        sizes = out["image_sizes"].tolist() if images else []  # [num_images] x (height, width)
        lengths = [self.num_image_tokens(h, w) for h, w in sizes]
        offsets = self.cut_placeholders(token_ids, self.placeholder_token_id(tokenizer, IMAGE), lengths)
        # pixel_values is [num_images, max tiles, 3, S, S], zero-padded to the most tiles of the batch:
        # each item keeps its own tiles only ([tiles, 3, S, S]), as get_image_features does.
        splits = {"pixel_values": Split.padded("tiles", keepdim=False), "image_sizes": Split.batched()}
        tiles = [self.num_tiles(h, w) for h, w in sizes]
        inputs = split_items(out, splits, len(images), sizes={"tiles": tiles}) if images else []
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for offset, length, item_inputs in zip(offsets, lengths, inputs)]
        video_lengths = [self.num_video_tokens(len(video.frames)) for video in videos]
        video_offsets = self.cut_placeholders(token_ids, self.placeholder_token_id(tokenizer, VIDEO), video_lengths)
        video_inputs = split_items(out, {"pixel_values_videos": Split.batched()}, len(videos)) if videos else []
        items += [ProcessedItem(modality=VIDEO, offset=offset, length=length, encoder_inputs=item_inputs)
                  for offset, length, item_inputs in zip(video_offsets, video_lengths, video_inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=sorted(items, key=lambda item: item.offset))

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        if modality == IMAGE:
            return super().encoder_schema(modality)
        size = self.tile_size
        return ItemSchema(tensors=(TensorSpec("pixel_values_videos", (1, "frames", 3, size, size)),),
                          patches=f"frames*{self.patches_per_tile}",
                          derive=lambda item, bindings: {"tokens": self.num_video_tokens(bindings["frames"])})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        if modality == IMAGE:  # LLaVA-NeXT's call and row check; get_image_features patches every image
            return super().encode(model, modality, items)
        # Clips of one frame count run together ([videos, frames, ...] as the processor stacks them).
        groups: dict[int, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item["pixel_values_videos"].shape[1], []).append(index)
        results: list[ItemEmbeddings | None] = [None] * len(items)
        for frames, indexes in groups.items():
            pixels = torch.cat([items[i]["pixel_values_videos"] for i in indexes]).to(model.device)
            rows = model.model.get_video_features(pixel_values_videos=pixels).pooler_output  # [videos, tokens, hidden]
            if rows.shape[1] != self.num_video_tokens(frames):  # the placeholder run was cut with this count
                raise Internal(f"LLaVA-OneVision made {rows.shape[1]} rows for a {frames}-frame video, the "
                               f"processor's placeholder run has {self.num_video_tokens(frames)}",
                               reason="ENCODER_OUTPUT_MISMATCH")
            for i, item_rows in zip(indexes, rows):
                results[i] = ItemEmbeddings(embeddings=item_rows)
        return results  # type: ignore[return-value]
