"""Llama 4: a tiled vision tower whose tiles are pixel-shuffled into a few tokens each, and the Llama 4
MoE language model (chunked attention on RoPE layers, temperature-tuned NoPE layers).

What transformers 5.23's Llama4ForConditionalGeneration.forward does, and where this file does the same:
- Each image is cut into tiles (plus a global view when it has more than one, after them), every tile
  the tower's input size; the tower turns each into (size / patch)^2 / 4 rows, and one linear layer
  projects them to the text width (`get_image_features`, `multi_modal_projector` over the rows of all
  images flattened): `encode`.
- The prompt holds per image `<|image_start|>`, the tiles' `<|patch|>` runs between tile separators,
  `<|image|>`, the global view's run, `<|image_end|>`; the patch tokens take the rows in order. One
  item is one image, its runs the spans between separators: `preprocess`.
- The text model builds its own masks (causal, and chunked on RoPE layers) and positions from the
  prompt: the default prefill serves it.

Batched decode: the NoPE layers scale queries by a temperature computed from the cache's length
(`past_key_values.get_seq_length`), and the chunked masks take chunk boundaries from cache indexes,
both of which count a row's left padding in a merged batch cache; so every request decodes alone
(`supports_batching = False`), as it would in generate(). Measured on the tiny checkpoint with
batching forced on (tests/llm/test_batching.py): rows' logits off by up to 0.2 at their first batched step.

The image processor normalises in bfloat16 whatever the model's dtype (the original implementation's
rounding); the encoder casts the pixels to the tower's dtype, as a caller of transformers must.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.models.base import (
    IMAGE,
    ItemEmbeddings,
    ModelFamily,
    ProcessedItem,
    ProcessedPrompt,
)
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items


class Llama4(ModelFamily):
    name = "llama4"
    hf_architectures = ("Llama4ForConditionalGeneration",)
    modalities = (IMAGE,)
    supports_batching = False  # see the module docstring
    # Tiles are the tower's batch, each on its own; the projector is one linear layer over rows.
    encoder_batching = "exact"

    @property
    def tile_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def tokens_per_tile(self) -> int:
        vision = self.config.vision_config
        return int((vision.image_size // vision.patch_size) ** 2 * vision.pixel_shuffle_ratio**2)

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|patch|>"}[modality]

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        # As transformers' apply_chat_template(tokenize=True): a prompt that starts with <bos> gets no other.
        bos = processor.tokenizer.bos_token
        kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        out = processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.config.image_token_id)
        starts = [i for i, tok in enumerate(token_ids) if tok == self.config.boi_token_index]
        # each image's runs: those after its <|image_start|> and before the next one
        bounds = [*starts[1:], len(token_ids)]
        per_image = [[run for run in runs if start < run[0] < end] for start, end in zip(starts, bounds)]
        lengths = [sum(n for _, n in image_runs) for image_runs in per_image]
        if not images:
            self.check_counts("images", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=[])
        if (len(lengths) != len(images) or sum(lengths) != sum(n for _, n in runs)
                or any(length == 0 or length % self.tokens_per_tile for length in lengths)):
            raise InvalidArgument(f"images: the processor made {len(lengths)} image blocks of {lengths} placeholder "
                                  f"tokens for {len(images)} images of {self.tokens_per_tile}-token tiles",
                                  reason="PLACEHOLDER_COUNT_MISMATCH")
        tiles = [length // self.tokens_per_tile for length in lengths]
        inputs = split_items(out, {"pixel_values": Split.flat("tiles")}, len(images), {"tiles": tiles})
        items = [ProcessedItem(modality=IMAGE, offset=image_runs[0][0], length=length, encoder_inputs=item_inputs,
                               runs=tuple(image_runs))
                 for image_runs, length, item_inputs in zip(per_image, lengths, inputs, strict=True)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        size = self.tile_size
        return ItemSchema(tensors=(TensorSpec("pixel_values", ("tiles", 3, size, size)),),
                          patches=f"tiles*{(size // self.config.vision_config.patch_size) ** 2}",
                          derive=lambda item, bindings: {"tokens": bindings["tiles"] * self.tokens_per_tile})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(model.device, model.dtype)  # [T, 3, S, S]
        features = model.get_image_features(pixel_values=pixel_values).last_hidden_state  # [T, tokens, vision_out]
        rows = model.multi_modal_projector(features.view(-1, features.size(-1)))  # as the forward: all rows at once
        sizes = [it["pixel_values"].shape[0] * self.tokens_per_tile for it in items]
        return [ItemEmbeddings(embeddings=r) for r in torch.split(rows, sizes)]

    # ---- towers and language model live on the top module (no `.model`) ------------------
    def strip_for_encoder(self, model: PreTrainedModel) -> None:
        model.language_model = None

    def strip_for_llm(self, model: PreTrainedModel) -> None:
        model.vision_model = None
        model.multi_modal_projector = None

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.language_model.model

    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.language_model.lm_head
