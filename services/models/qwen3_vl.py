"""Qwen3-VL: Qwen2-VL's placeholders and mRoPE (interleaved, inside the model), plus deepstack.

Deepstack: besides the merged rows that replace the placeholders, the tower returns one more
[num_tokens, hidden] tensor per `deepstack_visual_indexes` block. The language model adds the
k-th of them to its hidden states at the visual positions after its k-th layer. The encoder sends
them as ItemEmbeddings.deepstack; the LLM passes them to `language_model` as Qwen3VLModel.forward
does: `visual_pos_masks` [1, L] (True at every image and video placeholder) and
`deepstack_visual_embeds`, one [num_visual_tokens, hidden] tensor per layer, items concatenated in
prompt order. Decode steps pass neither (the visual rows are in the cache by then), as
transformers' generate does.

Video: the processor writes a timestamp before each frame group (grid step t, `temporal_patch_size`
frames): `<2.3 seconds><|vision_start|><|video_pad|>...<|vision_end|>` per step, the time being the
mean of the group's frames' `frames_indices / fps`. So one video is t placeholder runs of h*w/merge²
tokens each, which take consecutive rows of its embeddings (`video_item`). Its mRoPE positions are
per run as well: get_rope_index splits video_grid_thw [[t, h, w]] into t grids [[1, h, w]], one per
run, with the timestamp tokens between them as text; each run carries its own [[1, h, w]] to the LLM.
The frames are the video processor's own `sample_frames` (ModelFamily.video_frame_indices), and
their indices in the metadata give the same timestamps as transformers sampling them itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, PlacedEmbeddings, PrefillInputs, ProcessedItem
from services.models.inputs import Bindings, ItemSchema, Split, split_items
from services.models.qwen2_vl import Qwen2VL

GRID = "video_grid_thw"


class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    hf_architectures = ("Qwen3VLForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)

    @property
    def num_deepstack_layers(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes)

    # ---- video: one placeholder run per timestamped frame group --------------------------
    def position_schema(self, modality: str) -> ItemSchema:
        schema = super().position_schema(modality)
        if modality != VIDEO:
            return schema

        def derive(item: Mapping[str, torch.Tensor], bindings: Bindings) -> Bindings:
            if bindings["t"] != 1:  # get_rope_index would give such a run the positions of one step only
                raise ValueError(f"{GRID} {[bindings['t'], bindings['h'], bindings['w']]}: a video's positions go "
                                 "per timestamped frame group, one placeholder run each with t = 1")
            return schema.derive(item, bindings)

        return replace(schema, derive=derive)

    def _items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], modality: str,
               count: int) -> list[ProcessedItem]:
        if modality != VIDEO:
            return super()._items(processor, out, token_ids, modality, count)
        runs = self.modality_runs(processor, token_ids, VIDEO)
        grids = out[GRID].tolist() if count else []  # [[t, h, w]] per video
        merge = self.spatial_merge_size
        self.check_counts("video frame groups", [h * w // merge**2 for t, h, w in grids for _ in range(t)],
                          [n for _, n in runs])
        if not count:
            return []
        inputs = split_items(out, {"pixel_values_videos": Split.flat("patches"), GRID: Split.batched()}, count,
                             sizes={"patches": [t * h * w for t, h, w in grids]})
        items, first = [], 0
        for (t, _, _), encoder_inputs in zip(grids, inputs):
            items.append(self.video_item(runs[first : first + t], encoder_inputs))
            first += t
        return items

    def video_item(self, runs: Sequence[tuple[int, int]], encoder_inputs: dict[str, torch.Tensor]) -> ProcessedItem:
        """One video from its placeholder runs (one per grid step t, in order) and its encoder inputs: the
        runs take consecutive rows of its embeddings, and each carries its frame group's grid [[1, h, w]]."""
        step = encoder_inputs[GRID].clone()
        step[0, 0] = 1
        return ProcessedItem(modality=VIDEO, offset=runs[0][0], length=sum(n for _, n in runs),
                             encoder_inputs=encoder_inputs, runs=tuple(runs),
                             run_position_inputs=tuple({GRID: step} for _ in runs))

    def dropped_video_runs(self, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> list[tuple[int, torch.Tensor]]:
        """EVS: a frame group that kept no token is `<ts><|vision_start|><|vision_end|>` in the prompt (its
        timestamp and markers stay, as vLLM keeps them); its tokens go back between the two markers, with
        the grid of the pruned video before it (a video's first group is always kept, so one is)."""
        if not any(item.kept is not None for item in placed if item.modality == VIDEO):
            return []
        start, end = self.config.vision_start_token_id, self.config.vision_end_token_id
        empty = ((token_ids[:-1] == start) & (token_ids[1:] == end)).nonzero()[:, 0] + 1  # each block's <|vision_end|>
        found = []
        for offset in empty.tolist():
            before = [item for item in placed if item.modality == VIDEO and item.offset < offset]
            if not before or before[-1].kept is None:
                raise InvalidArgument(f"an empty <|vision_start|><|vision_end|> block at token {offset - 1} follows no "
                                      "pruned video: only a frame group that EVS dropped whole is empty",
                                      reason="VIDEO_KEPT_TOKENS_INVALID")
            found.append((offset, before[-1].position_inputs[GRID].long()))
        return found

    # ---- encoder and LLM ---------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        out = self.tower_features(model, modality, items)
        # pooler_output: one [n_i, H] per item; deepstack_features: per layer, one [n_i, H] per item (a tower
        # without deepstack, as Qwen3.5's, returns none)
        per_layer = out.deepstack_features if self.num_deepstack_layers else ()
        return [
            ItemEmbeddings(embeddings=rows, deepstack=tuple(layer[i] for layer in per_layer))
            for i, rows in enumerate(out.pooler_output)
        ]

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        prefill = super().prefill_inputs(model, token_ids, placed)
        num_layers = self.num_deepstack_layers
        if not placed or not num_layers:
            return prefill  # text only, or a model without deepstack: no deepstack, as in transformers
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
        # visual_pos_masks selects in prompt order, images and video runs alike
        ordered = sorted(placed, key=lambda item: item.offset)
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
