"""LLaVA-NeXT (1.6): "anyres" tiles plus a base view, unpadded to the image's aspect ratio, with a
learned image_newline row end after every row of the tiled grid; plain 1-D positions.

How many placeholder tokens an image gets depends on its original size (height, width), which the
processor returns as `image_sizes`. Worked example with 56 px tiles of 14 px patches (4x4 = 16
tokens per tile) and pinpoints 56x112, 112x56, 112x112, 168x56, 56x168 (height x width):

    a 120x160 image (h x w) -> best resolution 112x112 -> 2x2 tiles -> an 8x8 grid of patches;
    unpadded to the aspect ratio 160/120: height round(120 * 8/160) = 6 rows of 8 patches;
    tokens = 16 (base view) + 6 rows * (8 patches + 1 image_newline) = 70.

The encoder returns exactly the rows of model.model.get_image_features (which calls
pack_image_features) for each image; the processor's expansion must equal that count, which
`num_image_tokens` computes from the model's config and preprocess checks for every image.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin
from transformers.image_processing_utils import select_best_resolution

from services.common.errors import Internal
from services.models.base import IMAGE, ItemEmbeddings, ProcessedItem, ProcessedPrompt
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items
from services.models.llava import Llava


class LlavaNext(Llava):
    name = "llava_next"
    hf_architectures = ("LlavaNextForConditionalGeneration",)

    # ---- sizes -------------------------------------------------------------------------
    def _grid(self, height: int, width: int) -> tuple[int, int]:
        """Tiles (down, across) of the pinpoint resolution that the image is resized into."""
        best_height, best_width = select_best_resolution((height, width), self.config.image_grid_pinpoints)
        return best_height // self.tile_size, best_width // self.tile_size

    def num_tiles(self, height: int, width: int) -> int:
        """pixel_values rows of one image: the grid's tiles plus the base view (image_size_to_num_patches)."""
        rows, cols = self._grid(height, width)
        return rows * cols + 1

    def num_image_tokens(self, height: int, width: int) -> int:
        """Rows that pack_image_features makes of an image of this original size.

        As the model: the tiles' patch grid is cropped (unpad_image) to the image's aspect ratio,
        each remaining row ends with one image_newline row; the base view comes first.
        """
        side = self.tile_size // self.config.vision_config.patch_size  # patches per tile side
        rows, cols = self._grid(height, width)
        grid_h, grid_w = rows * side, cols * side
        if width / height > grid_w / grid_h:  # wider than the grid: padding above and below
            padding = (grid_h - int(round(height * (grid_w / width), 7))) // 2
            grid_h -= 2 * padding
        else:
            padding = (grid_w - int(round(width * (grid_h / height), 7))) // 2
            grid_w -= 2 * padding
        return self.tokens_per_tile + grid_h * (grid_w + 1)

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        sizes = out["image_sizes"].tolist() if images else []  # [num_images] x (height, width)
        lengths = [self.num_image_tokens(h, w) for h, w in sizes]
        offsets = self.cut_placeholders(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE), lengths)
        # pixel_values is [num_images, max tiles, 3, S, S], zero-padded to the most tiles of the batch:
        # each item keeps its own tiles only ([tiles, 3, S, S]), as get_image_features does.
        splits = {"pixel_values": Split.padded("tiles", keepdim=False), "image_sizes": Split.batched()}
        tiles = [self.num_tiles(h, w) for h, w in sizes]
        inputs = split_items(out, splits, len(images), sizes={"tiles": tiles}) if images else []
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for offset, length, item_inputs in zip(offsets, lengths, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    def _tiles(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        """The model splits the concatenated tiles by the count image_sizes implies: a wrong count would
        shift every later item's tiles, so it is refused."""
        height, width = bindings["height"], bindings["width"]
        if bindings["tiles"] != self.num_tiles(height, width):
            raise ValueError(f"pixel_values has {bindings['tiles']} tiles, image_sizes {[height, width]} needs "
                             f"{self.num_tiles(height, width)}")
        return {"tokens": self.num_image_tokens(height, width)}

    def encoder_schema(self, modality: str) -> ItemSchema:
        size = self.tile_size
        return ItemSchema(tensors=(
            TensorSpec("pixel_values", ("tiles", 3, size, size)),
            TensorSpec("image_sizes", (1, 2), INT, values=("height", "width")),  # the original image, in pixels
        ), patches=f"tiles*{self.patches_per_tile}", derive=self._tiles)

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        sizes = [tuple(item["image_sizes"][0].tolist()) for item in items]  # (height, width) each
        device = model.device
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(device)  # [all tiles, 3, S, S]
        image_sizes = torch.cat([it["image_sizes"] for it in items]).to(device)  # [B, 2]
        out = model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes)
        embeddings = list(out.pooler_output)  # B x [num_image_tokens, hidden], image_newline rows included
        for (height, width), emb in zip(sizes, embeddings):
            expected = self.num_image_tokens(height, width)
            if emb.shape[0] != expected:  # the placeholder run was cut with this count
                raise Internal(f"LLaVA-NeXT made {emb.shape[0]} rows for a {height}x{width} image, "
                               f"the processor's placeholder run has {expected}", reason="ENCODER_OUTPUT_MISMATCH")
        return [ItemEmbeddings(embeddings=e) for e in embeddings]

    # ---- llm ---------------------------------------------------------------------------
    def strip_for_llm(self, model: PreTrainedModel) -> None:
        super().strip_for_llm(model)
        model.model.image_newline = None  # part of the encoder's output rows
