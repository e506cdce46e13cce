"""Gemma 4: a variable-resolution vision tower pooled 3x3 to a token count that follows the image's
shape, and a Gemma 4 language model with per-layer embeddings; images only (its audio and video
paths are not served).

What transformers 5.23's Gemma4Model.forward does, and where this file does the same:
- Each image is resized (aspect ratio kept) to at most `max_soft_tokens` x 9 patches, its patch list
  padded to that budget (positions -1 on padding); the tower pools 9 patches into one row and the
  model splits the rows per image by its unpadded patches (`get_image_features`): `encode`. The
  prompt holds `<boi>` + N x image token + `<eoi>` per image, N from the image's shape.
- Token embeddings: placeholders are looked up as the pad token, then replaced by the image rows
  (`Gemma4TextScaledWordEmbedding` scales token rows only): `prefill_inputs`.
- Per-layer embeddings: a second token table gives every layer an input of its own, looked up from
  the token ids with placeholders as the pad token; the text model needs them passed beside
  `inputs_embeds` (else it reverses the embedding, which image rows defeat): `prefill_inputs` at
  prefill, `decode_token_kwargs` for each decoded token.
- Where the text config says `use_bidirectional_attention="vision"`, the prefill's sliding layers let
  each image's tokens attend to each other both ways (`create_masks_for_vision_model`, blocks from
  the processor's mm_token_type_ids, 1 on image tokens); full layers stay causal. Otherwise the plain
  masks. Built here with the same transformers functions and handed to the engine.
- The KV-shared layers (`num_kv_shared_layers`) run the prefill's last position only, as generate()'s
  `logits_to_keep=1` makes them.
- Final-logit softcapping is applied by the whole model's forward: `lm_head` applies it too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin
from transformers.masking_utils import create_masks_for_generate
from transformers.models.gemma4.modeling_gemma4 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

from services.models.base import (
    IMAGE,
    ItemEmbeddings,
    ModelFamily,
    PlacedEmbeddings,
    PrefillInputs,
    ProcessedItem,
    ProcessedPrompt,
)
from services.models.inputs import INT, ItemSchema, Split, TensorSpec, split_items
from services.models.paligemma import SoftcappedHead


class Gemma4(ModelFamily):
    name = "gemma4"
    hf_architectures = ("Gemma4ForConditionalGeneration",)
    modalities = (IMAGE,)
    tower_attributes = ("vision_tower", "embed_vision", "audio_tower", "embed_audio")
    # Every image is padded to the same patch budget and the tower masks the padding: no op mixes items.
    encoder_batching = "exact"

    @property
    def pooling(self) -> int:
        return self.config.vision_config.pooling_kernel_size

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image|>"}[modality]

    def placeholder_token_id(self, tokenizer, modality: str) -> int:
        return self.config.image_token_id

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        # As transformers' apply_chat_template(tokenize=True): a prompt that starts with <bos> gets no other.
        bos = processor.tokenizer.bos_token
        kwargs = {"add_special_tokens": False} if bos and text.startswith(bos) else {}
        out = processor(text=[text], images=images or None, return_tensors="pt", **kwargs)
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.config.image_token_id)
        if not images:
            self.check_counts("images", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=[])
        inputs = split_items(out, {"pixel_values": Split.batched(), "image_position_ids": Split.batched()}, len(images))
        self.check_counts("images", [self._tokens(item) for item in inputs], [n for _, n in runs])
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for (offset, length), item_inputs in zip(runs, inputs, strict=True)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    def _tokens(self, item: dict[str, torch.Tensor]) -> int:
        """Soft tokens of one image: its unpadded patches, pooled."""
        return int((item["image_position_ids"] != -1).all(dim=-1).sum()) // self.pooling**2

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        return ItemSchema(tensors=(TensorSpec("pixel_values", (1, "patches", "patch_dim")),
                                   TensorSpec("image_position_ids", (1, "patches", 2), INT)),
                          patches="patches", derive=lambda item, bindings: {"tokens": self._tokens(item)})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        # Every item is padded to the processor's patch budget, so they stack as the processor's batch does.
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(model.device)  # [B, P, 3 x p x p]
        positions = torch.cat([it["image_position_ids"] for it in items]).to(model.device)  # [B, P, 2]
        rows = model.model.get_image_features(pixel_values, positions).pooler_output  # one [N_i, hidden] per image
        return [ItemEmbeddings(embeddings=r) for r in rows]

    # ---- llm ---------------------------------------------------------------------------
    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        cap = self.text_config.final_logit_softcapping
        return model.lm_head if cap is None else SoftcappedHead(model.lm_head, cap)

    def _per_layer_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor) -> dict[str, Any]:
        if not self.text_config.hidden_size_per_layer_input:
            return {}
        return {"per_layer_inputs": self.language_model(model).get_per_layer_inputs(token_ids, None)}

    def decode_token_kwargs(self, model: PreTrainedModel, token_ids: torch.Tensor) -> dict[str, Any]:
        return self._per_layer_inputs(model, token_ids)  # decoded tokens are text tokens

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        is_image = token_ids == self.config.image_token_id  # [L]
        lookup_ids = token_ids.masked_fill(is_image, self.text_config.pad_token_id)[None]  # [1, L]
        embeds = model.get_input_embeddings()(lookup_ids)  # [1, L, H], scaled by sqrt(H)
        for item in placed:
            embeds[0, item.offset : item.offset + item.length] = item.embeddings.embeddings.to(embeds.device, embeds.dtype)
        length = token_ids.shape[0]
        mask_kwargs = dict(
            config=model.config.get_text_config(),  # the loaded one: it names the attention implementation
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, length, dtype=torch.long, device=embeds.device),
            past_key_values=self.new_cache(model),  # empty, like the engine's: sizes the masks for prefill
            position_ids=torch.arange(length, device=embeds.device)[None],
        )
        if self.text_config.use_bidirectional_attention == "vision":
            # the processor's mm_token_type_ids are 1 on image tokens; text-only prompts get them all 0
            blocks = get_block_sequence_ids_for_mask(is_image[None].long(), device=embeds.device)
            masks = create_masks_for_vision_model(block_sequence_ids=blocks, **mask_kwargs)
        else:
            masks = create_masks_for_generate(**mask_kwargs)
        # logits_to_keep=1, as generate() prefills: the KV-shared layers (which write no cache) then run the
        # last position only; over the whole prompt their GEMMs differ in the last bits.
        return PrefillInputs(inputs_embeds=embeds, position_ids=None,
                             layer_kwargs={"attention_mask": masks, "logits_to_keep": 1,
                                           **self._per_layer_inputs(model, lookup_ids)})
