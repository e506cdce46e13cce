"""Gemma 3: a SigLIP tower pooled to a fixed number of tokens per image, and a language model whose
prefill lets the tokens of one image attend to each other both ways.

What transformers 5.23's Gemma3Model.forward does, and where this file does the same:
- Each image is one square crop (no pan-and-scan) that the tower turns into `mm_tokens_per_image`
  rows (`get_image_features(...).pooler_output`): `encode`.
- The prompt holds `\\n\\n<start_of_image>` + N x `<image_soft_token>` + `<end_of_image>\\n\\n` per image;
  the soft tokens' embeddings are replaced by the image rows *after* the text embedding's
  sqrt(hidden) scaling (Gemma3TextScaledWordEmbedding scales token embeddings only): `prefill_inputs`.
- At prefill, `token_type_ids` (1 on soft tokens) turn each maximal run of soft tokens into a block
  that attends to itself bidirectionally, on top of the causal mask (full-attention layers) and
  inside the sliding window (sliding layers): `create_masks_for_vision_model`. Decode steps use
  the plain causal/sliding masks, which the text model builds itself. The masks are built here with
  the same transformers function, from the token ids (the processor's token_type_ids are exactly
  `input_ids == image_token_id`), and handed to the engine as the prefill's `attention_mask`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin
from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

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


class Gemma3(ModelFamily):
    name = "gemma3"
    hf_architectures = ("Gemma3ForConditionalGeneration",)
    modalities = (IMAGE,)
    # Fixed-size SigLIP crops stacked on the batch dim; no op mixes them.
    encoder_batching = "exact"

    @property
    def tokens_per_image(self) -> int:
        return self.config.mm_tokens_per_image

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<image_soft_token>"}[modality]

    def checkpoint_refusal(self) -> str | None:
        # ShieldGemma 2 builds this class, but its processor writes one prompt per (image, safety policy)
        # and its answer is the Yes/No probability of each: a classifier, not a chat generation.
        if self.config.model_type == "shieldgemma2":
            return ("ShieldGemma 2 is an image-safety classifier (one prompt per image and policy, read as "
                    "Yes/No probabilities), not a chat model; serve it with transformers' ShieldGemma2 classes")
        return None

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        # As transformers' apply_chat_template(tokenize=True): a rendered prompt that already starts
        # with <bos> is tokenized without adding another one.
        bos = processor.tokenizer.bos_token
        kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        out = processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        if not images:
            self.check_counts("images", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=[])
        pixel_values = out["pixel_values"]  # [num_crops, 3, S, S]
        if pixel_values.shape[0] != len(images):
            # Pan-and-scan adds crops, each with its own <start_of_image> block: one image would
            # span several placeholder runs, which one item (one range) cannot carry.
            raise InvalidArgument(
                f"the processor made {pixel_values.shape[0]} crops for {len(images)} images; pan-and-scan "
                "(do_pan_and_scan) is not supported, turn it off in the processor config",
                reason="PAN_AND_SCAN_UNSUPPORTED")
        self.check_counts("images", [self.tokens_per_image] * len(images), [n for _, n in runs])
        inputs = split_items(out, {"pixel_values": Split.batched()}, len(images))  # [1, 3, S, S] each
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for (offset, length), item_inputs in zip(runs, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        size = self.image_size
        return ItemSchema(tensors=(TensorSpec("pixel_values", (1, 3, size, size)),),
                          patches=str((size // self.config.vision_config.patch_size) ** 2),
                          derive=lambda item, bindings: {"tokens": self.tokens_per_image})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(model.device)  # [B, 3, S, S]
        out = model.model.get_image_features(pixel_values=pixel_values)
        features = out.pooler_output  # [B, mm_tokens_per_image, hidden]
        return [ItemEmbeddings(embeddings=f) for f in features]

    # ---- llm ---------------------------------------------------------------------------
    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        image_token_id = self.config.image_token_id
        is_image = token_ids == image_token_id  # [L]
        lookup_ids = token_ids
        if image_token_id >= self.text_config.vocab_size:  # as Gemma3Model: an out-of-vocab placeholder embeds as 0
            lookup_ids = token_ids.masked_fill(is_image, 0)
        embeds = model.get_input_embeddings()(lookup_ids[None])  # [1, L, H], scaled by sqrt(H)
        for item in placed:
            rows = item.embeddings.embeddings.to(embeds.device, embeds.dtype)
            embeds[0, item.offset : item.offset + item.length] = rows  # image rows are not scaled
        # transformers passes the processor's token_type_ids (all zeros without images) at prefill,
        # so the masks are always built this way; a text-only prompt gets plain causal/sliding masks.
        length = token_ids.shape[0]
        masks = create_masks_for_vision_model(
            config=model.config.get_text_config(),  # the loaded one: it names the attention implementation
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, length, dtype=torch.long, device=embeds.device),
            past_key_values=self.new_cache(model),  # empty, like the engine's: sizes the masks for prefill
            position_ids=None,
            block_sequence_ids=get_block_sequence_ids_for_mask(is_image[None].long(), device=embeds.device),
        )  # {"full_attention": ..., "sliding_attention": ...}
        return PrefillInputs(inputs_embeds=embeds, position_ids=None, layer_kwargs={"attention_mask": masks})
