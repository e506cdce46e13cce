"""Qwen3-VL: Qwen2-VL's placeholders and mRoPE (interleaved, inside the model), plus deepstack.

Deepstack: besides the merged rows that replace the placeholders, the tower returns one more
[num_tokens, hidden] tensor per `deepstack_visual_indexes` block. The language model adds the
k-th of them to its hidden states at the image positions after its k-th layer. The encoder sends
them as ItemEmbeddings.deepstack; the LLM passes them to `language_model` as Qwen3VLModel.forward
does: `visual_pos_masks` [1, L] (True at every placeholder) and `deepstack_visual_embeds`, one
[num_visual_tokens, hidden] tensor per layer, items concatenated in prompt order. Decode steps pass
neither (the image rows are in the cache by then), as transformers' generate does.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from services.common.errors import InvalidArgument
from services.models.base import IMAGE, ItemEmbeddings, PlacedEmbeddings, PrefillInputs
from services.models.qwen2_vl import Qwen2VL


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    hf_architectures = ("Qwen3VLForConditionalGeneration",)
    modalities = (IMAGE,)  # video: Qwen2-VL's path lacks second_per_grid_ts (2.5) and timestamps (3)

    @property
    def num_deepstack_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        out = self.tower_features(model, modality, items)
        # pooler_output: one [n_i, H] per item; deepstack_features: per layer, one [n_i, H] per item
        per_layer = out.deepstack_features
        return [
            ItemEmbeddings(embeddings=rows, deepstack=tuple(layer[i] for layer in per_layer))
            for i, rows in enumerate(out.pooler_output)
        ]

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        prefill = super().prefill_inputs(model, token_ids, placed)
        if not placed:
            return prefill  # text only: no deepstack, as in transformers
        num_layers = self.num_deepstack_layers
        for item in placed:
            got = len(item.embeddings.deepstack)
            if got != num_layers:
                raise InvalidArgument(
                    f"{item.modality} at offset {item.offset} has {got} deepstack tensors; this model adds "
                    f"{num_layers} (one per deepstack layer). Send the encoder's deepstack_embeddings with "
                    "the embeddings",
                    reason="DEEPSTACK_COUNT_MISMATCH",
                    metadata={"deepstackLayers": str(num_layers)},
                )
        ordered = sorted(placed, key=lambda item: item.offset)  # visual_pos_masks selects in prompt order
        embeds = prefill.inputs_embeds
        visual_pos_masks = torch.zeros(1, token_ids.shape[0], dtype=torch.bool, device=embeds.device)  # [1, L]
        for item in ordered:
            visual_pos_masks[0, item.offset : item.offset + item.length] = True
        deepstack_visual_embeds = [
            torch.cat([item.embeddings.deepstack[layer] for item in ordered]).to(embeds.device, embeds.dtype)
            for layer in range(num_layers)
        ]  # each [num_visual_tokens, H]
        prefill.layer_kwargs = {"visual_pos_masks": visual_pos_masks, "deepstack_visual_embeds": deepstack_visual_embeds}
        return prefill
