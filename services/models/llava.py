"""LLaVA-1.5: every image resized to one square, CLIP features of layer -2 without the CLS token,
projected by a two-layer MLP; plain 1-D positions.

The processor expands each `<image>` to the same number of tokens, (image_size / patch_size)^2 for
a CLIP tower (its CLS token counted by `num_additional_image_tokens=1` and dropped again by
`vision_feature_select_strategy="default"`). The processor returns only `pixel_values`: the
placeholders are found from the image token id.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

from services.common.errors import FailedPrecondition, InvalidArgument
from services.models.base import IMAGE, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items

# Vision towers whose token count the family knows: tokens per image before the select strategy is
# (image_size / patch_size)^2 + this many extra tokens (CLIP's CLS). Others (Pixtral, with its own
# image_sizes and break tokens) are a different layout and are refused rather than mis-served.
_TOWER_EXTRA_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


class Llava(ModelFamily):
    name = "llava"
    hf_architectures = ("LlavaForConditionalGeneration",)
    modalities = (IMAGE,)
    # Fixed-size crops (LLaVA-NeXT: tiles) stacked on the batch dim; no op mixes them.
    encoder_batching = "exact"

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        tower = config.vision_config.model_type
        if tower not in _TOWER_EXTRA_TOKENS:
            raise FailedPrecondition(
                f"{self.name}: vision tower {tower!r} is not supported (supported: {', '.join(sorted(_TOWER_EXTRA_TOKENS))})",
                reason="MODEL_UNSUPPORTED",
            )

    # ---- sizes -------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        """Pixels per side of what the tower sees (LLaVA-1.5: the centre crop)."""
        return self.config.vision_config.image_size

    @property
    def tokens_per_tile(self) -> int:
        """Embedding rows the tower + projector make of one tile, as get_image_features selects them."""
        side = self.tile_size // self.config.vision_config.patch_size
        tokens = side * side + _TOWER_EXTRA_TOKENS[self.config.vision_config.model_type]
        return tokens - 1 if self.config.vision_feature_select_strategy == "default" else tokens

    # ---- processor ---------------------------------------------------------------------
    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<image>"}[modality]

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        lengths = [self.tokens_per_tile] * len(images)
        offsets = self.cut_placeholders(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE), lengths)
        inputs = split_items(out, {"pixel_values": Split.batched()}, len(images)) if images else []  # [1, 3, S, S]
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for offset, length, item_inputs in zip(offsets, lengths, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    @staticmethod
    def cut_placeholders(token_ids: list[int], token_id: int, lengths: list[int]) -> list[int]:
        """Offsets of the items' placeholder runs: the image tokens taken in prompt order, `lengths[i]` each.

        Stricter than splitting at maximal runs: two images whose runs touch are still told apart,
        and a run that does not hold exactly one item's tokens is an error, never a silent shift.
        """
        positions = [i for i, tok in enumerate(token_ids) if tok == token_id]
        if len(positions) != sum(lengths):
            raise InvalidArgument(
                f"images: the processor made {len(positions)} placeholder tokens, the {len(lengths)} items "
                f"need {lengths} (sum {sum(lengths)})",
                reason="PLACEHOLDER_COUNT_MISMATCH",
            )
        offsets, start = [], 0
        for index, length in enumerate(lengths):
            run = positions[start : start + length]
            if run[-1] - run[0] != length - 1:
                raise InvalidArgument(
                    f"image {index}: its {length} placeholder tokens are not contiguous in the prompt "
                    f"(from {run[0]} to {run[-1]})",
                    reason="PLACEHOLDER_COUNT_MISMATCH",
                )
            offsets.append(run[0])
            start += length
        return offsets

    # ---- encoder -----------------------------------------------------------------------
    @property
    def patches_per_tile(self) -> int:
        return (self.tile_size // self.config.vision_config.patch_size) ** 2

    def encoder_schema(self, modality: str) -> ItemSchema:
        size = self.tile_size
        return ItemSchema(tensors=(TensorSpec("pixel_values", (1, 3, size, size)),), patches=str(self.patches_per_tile),
                          derive=lambda item, bindings: {"tokens": self.tokens_per_tile})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(model.device)  # [B, 3, S, S]
        # vision_feature_layer / select strategy default to the config's, as in the model's forward.
        out = model.model.get_image_features(pixel_values=pixel_values)
        return [ItemEmbeddings(embeddings=e) for e in out.pooler_output]  # B x [tokens_per_tile, hidden]
