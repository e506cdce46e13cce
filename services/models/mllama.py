"""Llama 3.2 Vision (MllamaForConditionalGeneration): images enter through cross-attention layers.

Each image is ONE `<|image|>` token in the prompt; its embeddings never replace token rows. The
tower (tiles of `image_size` px, up to `max_num_tiles` per image, chosen by aspect ratio) and the
projector turn an image into cross-attention states, [tiles x patches, hidden] (patches = (image_size
/ patch)^2 + CLS per tile), which the language model's cross-attention layers attend to. So an item
carries these states (the contract's `cross_attention_states`), not placeholder rows.

Which text token sees which image is the processor's rule (`get_cross_attention_token_mask`): image
i is seen from its `<|image|>` token up to the next image's token (consecutive image tokens all see
to the end), the last image to the end; a token that sees no image skips the cross-attention MLP
(`full_text_row_masked_out_mask`). The LLM computes both masks from the token ids and each image's
tile count (the processor's aspect_ratio_mask, sent as a position input), exactly as the processor and the model do.

K/V of the cross-attention layers: computed from the states once, at prefill, and kept in the
request's cache (transformers' cross-attention layers write them into the cache layer of their
index); decode steps pass no states and read them back. The next token's mask row is the prompt's
last row (transformers repeats it per generated token), kept in the request's decode kwargs.

Batched decode (services/llm/engine): rows with images share a forward, text-only rows another (their
forward skips the cross-attention layers, as transformers' does: `decode_group`). The cross-attention
layers' cache is not on the text timeline (`fixed_cache_layers`): the batch cache right-pads each row's
vision K/V to the longest row's, and each row's decode mask gives those padding positions
finfo.min, so their softmax weights are exactly 0 (every decoded token of a prompt with images sees at
least its last image, so no row's mask is all padding).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, ProcessorMixin
from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask
from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

from services.common.errors import InvalidArgument
from services.models.base import (
    IMAGE,
    ItemEmbeddings,
    ModelFamily,
    PlacedEmbeddings,
    PrefillInputs,
    ProcessedItem,
    ProcessedPrompt,
)
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items


class Mllama(ModelFamily):
    name = "mllama"
    hf_architectures = ("MllamaForConditionalGeneration",)
    modalities = (IMAGE,)
    cross_attention = True
    # Images stack on the batch dim; the tower mixes the tiles of one image only (its global layers).
    encoder_batching = "exact"
    tower_attributes = ("vision_model", "multi_modal_projector")

    # ---- sizes -------------------------------------------------------------------------
    @property
    def max_num_tiles(self) -> int:
        return self.config.vision_config.max_num_tiles

    @property
    def patches_per_tile(self) -> int:
        """Cross-attention rows per tile: the tower's patches plus its CLS token."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    # ---- processor ---------------------------------------------------------------------
    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image|>"}[modality]

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=[images] if images else None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        image_id = self.placeholder_token_id(processor.tokenizer, IMAGE)
        offsets = [i for i, tok in enumerate(token_ids) if tok == image_id]
        self.check_counts("images", [1] * len(images), [1] * len(offsets))
        if not images:
            return ProcessedPrompt(token_ids=token_ids, items=[])
        # Per image: pixel_values [1, 1, max_tiles, 3, S, S], aspect_ratio_ids [1, 1], aspect_ratio_mask [1, 1, max_tiles].
        per_image = {name: out[name].squeeze(0) for name in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
        inputs = split_items(per_image, {name: Split.batched() for name in per_image}, len(images))
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=1,
                               encoder_inputs={name: t.unsqueeze(0) for name, t in item.items()},
                               position_inputs={"aspect_ratio_mask": item["aspect_ratio_mask"]})  # [1, max_tiles]
                 for offset, item in zip(offsets, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    def encoder_schema(self, modality: str) -> ItemSchema:
        size, tiles = self.config.vision_config.image_size, self.max_num_tiles
        return ItemSchema(tensors=(TensorSpec("pixel_values", (1, 1, tiles, 3, size, size)),
                                   TensorSpec("aspect_ratio_ids", (1, 1), kind="int"),
                                   TensorSpec("aspect_ratio_mask", (1, 1, tiles), kind="int")),
                          patches=str(tiles * self.patches_per_tile), derive=self._check_tiles)

    def _check_tiles(self, item, bindings, ratio: bool = True) -> dict[str, int]:
        """The aspect ratio id is one the tower has; the tile mask is 1 for the first tiles, 0 after."""
        num_aspect_ratios = len(self.config.vision_config.supported_aspect_ratios)
        if ratio and not 1 <= int(item["aspect_ratio_ids"].reshape(-1)[0]) <= num_aspect_ratios:
            raise ValueError(f"aspect_ratio_ids {item['aspect_ratio_ids'].tolist()} is outside [1, {num_aspect_ratios}]")
        mask = item["aspect_ratio_mask"].reshape(-1)
        tiles = int(mask.sum())
        if tiles < 1 or not bool((mask[:tiles] == 1).all()) or bool(mask[tiles:].any()):
            raise ValueError(f"aspect_ratio_mask {mask.tolist()} is not 1 for the first tiles and 0 after")
        return {"tokens": 1}

    # ---- encoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        """Per image: the projected vision states of all `max_num_tiles` tiles, [max_tiles x patches,
        hidden]. Padding tiles included: the text tokens that see no image (before the first one) get an
        all-zero cross-attention mask and attend to every row, padding tiles too, and the tower's outputs
        for those tiles depend on the image (its global layers mix tiles); dropping them changed the
        tiny model's logits by ~3."""
        device, hidden = model.device, self.hidden_size
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(device)  # [B, 1, T, 3, S, S]
        out = model.model.vision_model(pixel_values=pixel_values,
                                       aspect_ratio_ids=torch.cat([it["aspect_ratio_ids"] for it in items]).to(device),
                                       aspect_ratio_mask=torch.cat([it["aspect_ratio_mask"] for it in items]).to(device))
        states = out.last_hidden_state  # [B, 1, T, patches, vision_output_dim]
        states = model.model.multi_modal_projector(states).reshape(len(items), -1, hidden)  # [B, T x patches, H]
        return [ItemEmbeddings(embeddings=s, cross_attention=True) for s in states]

    def position_schema(self, modality: str) -> ItemSchema:
        """Which of an image's tiles are real (the processor's aspect_ratio_mask): the cross-attention
        mask lets text see those only."""
        return ItemSchema(tensors=(TensorSpec("aspect_ratio_mask", (1, self.max_num_tiles), kind="int"),),
                          derive=lambda item, bindings: self._check_tiles(item, bindings, ratio=False))

    # ---- llm ---------------------------------------------------------------------------
    def check_cross_attention_states(self, shape: tuple[int, ...], where: str) -> None:
        expected = (self.max_num_tiles * self.patches_per_tile, self.hidden_size)
        if tuple(shape) != expected:
            raise InvalidArgument(
                f"{where} of shape {list(shape)}, expected {list(expected)} (an image's cross-attention states: "
                f"{self.max_num_tiles} tiles, padding ones included, x {self.patches_per_tile} patches, x hidden size)",
                reason="CROSS_ATTENTION_STATES_INVALID", metadata={"family": self.name})

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        embeds = model.get_input_embeddings()(token_ids[None])  # [1, L, H]: images add no rows
        if not placed:  # text only: the cross-attention layers are skipped, as in the model
            return PrefillInputs(inputs_embeds=embeds, position_ids=None)
        per_tile, max_tiles = self.patches_per_tile, self.max_num_tiles
        # [1, images x max_tiles x patches, H], image by image, as the model's projector output.
        states = torch.cat([item.embeddings.embeddings for item in placed]).to(embeds.device, embeds.dtype)[None]
        num_tiles = [int(item.position_inputs["aspect_ratio_mask"].sum()) for item in placed]
        image_id = int(token_ids[placed[0].offset])
        spans = get_cross_attention_token_mask(token_ids.tolist(), image_id)
        length = token_ids.shape[0]
        mask = torch.zeros(1, length, len(placed), max_tiles, dtype=torch.long, device=embeds.device)  # [1, L, I, T]
        for index, ((start, end), tiles) in enumerate(zip(spans, num_tiles)):
            mask[0, start : length if end == -1 else min(end, length), index, :tiles] = 1
        prefill_masks = _prepare_cross_attention_mask(mask, num_vision_tokens=per_tile, dtype=embeds.dtype)
        decode_masks = _prepare_cross_attention_mask(mask[:, -1:], num_vision_tokens=per_tile, dtype=embeds.dtype)
        return PrefillInputs(
            inputs_embeds=embeds, position_ids=None,
            layer_kwargs={"cross_attention_states": states,
                          "cross_attention_mask": prefill_masks[0], "full_text_row_masked_out_mask": prefill_masks[1]},
            # Every generated token sees what the prompt's last token sees (transformers repeats its mask row).
            decode_layer_kwargs={"cross_attention_mask": decode_masks[0],
                                 "full_text_row_masked_out_mask": decode_masks[1]})

    def decode_kwargs(self, prefill: PrefillInputs, cache_length: int) -> dict[str, Any]:
        return prefill.decode_layer_kwargs

    # ---- batched decode ----------------------------------------------------------------
    def decode_group(self, prefill: PrefillInputs) -> Hashable | None:
        return "images" if prefill.decode_layer_kwargs else "text"

    @property
    def fixed_cache_layers(self) -> frozenset[int]:
        return frozenset(self.text_config.cross_attention_layers)

    def batch_decode_kwargs(self, prefills: list[PrefillInputs], lengths: list[int]) -> dict[str, Any]:
        """Each row's mask of its next token, right-padded to the longest row's vision K/V (as the batch
        cache pads them) with finfo.min: [B, 1, 1, longest] and [B, 1, 1, 1]."""
        rows = [prefill.decode_layer_kwargs for prefill in prefills]
        if not rows[0]:  # a text-only group (decode_group keeps the kinds apart)
            return {}
        masks = [row["cross_attention_mask"] for row in rows]  # each [1, 1, 1, images x tiles x patches]
        longest = max(mask.shape[-1] for mask in masks)
        fill = torch.finfo(masks[0].dtype).min
        return {"cross_attention_mask": torch.cat([F.pad(m, (0, longest - m.shape[-1]), value=fill) for m in masks]),
                "full_text_row_masked_out_mask": torch.cat([row["full_text_row_masked_out_mask"] for row in rows])}
