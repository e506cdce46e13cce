"""Qwen2-VL: variable patches per image (grid_thw), merged 2x2, and mRoPE positions.

Video is the same tower on frames grouped by its temporal patch (2 frames per grid step t): one
`<|video_pad|>` run per video, `pixel_values_videos` + `video_grid_thw`, and mRoPE positions that
advance along t. The processor chooses the frames (ModelFamily.video_frame_indices) before decoding.

EVS (services/models/evs.py): a video's merged tokens come frame group by frame group (t, then h/2,
w/2), which is the grid EVS compares. A pruned video keeps one shorter run; its kept rows take the
mRoPE positions they had unpruned, and the text after the video too (positions computed on the
unpruned prompt, then the dropped tokens' left out), so pruning changes which tokens attend, never
where the others sit.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.video import Video
from services.models import evs
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, ModelFamily, PlacedEmbeddings, PrefillInputs, ProcessedItem, ProcessedPrompt
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items

# mm_token_type_ids values that get_rope_index expects
_TOKEN_TYPE = {IMAGE: 1, VIDEO: 2}
# The processor's patches of an item, by modality.
_PIXELS = {IMAGE: "pixel_values", VIDEO: "pixel_values_videos"}


class Qwen2VL(ModelFamily):
    name = "qwen2_vl"
    hf_architectures = ("Qwen2VLForConditionalGeneration",)
    modalities = (IMAGE, VIDEO)
    # Items are packed into one patch sequence, each attending only to itself (cu_seqlens); measured
    # bitwise equal on this CPU, but the GEMMs over more rows may pick other blocking elsewhere.
    encoder_batching = "tolerance"
    encoder_batch_tolerance = 1e-5
    supports_video_pruning = True

    @property
    def spatial_merge_size(self) -> int:
        return self.config.vision_config.spatial_merge_size

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image_pad|>", VIDEO: "<|video_pad|>"}[modality]

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x temporal patch x patch x patch (1176 for 14 px RGB)."""
        vision = self.config.vision_config
        channels = getattr(vision, "in_channels", None) or getattr(vision, "in_chans", 3)
        return channels * vision.temporal_patch_size * vision.patch_size**2

    # ---- typed inputs ------------------------------------------------------------------
    def _grid(self, modality: str) -> TensorSpec:
        """[[t, h, w]]: the item's patches along time, height, width."""
        return TensorSpec(f"{modality}_grid_thw", (1, 3), INT, values=("t", "h", "w"))

    def _tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        """The merger joins merge x merge patches: the grid's sides must be multiples of it."""
        merge = self.spatial_merge_size
        t, h, w = bindings["t"], bindings["h"], bindings["w"]
        if h % merge or w % merge:
            name = next(name for name in item if name.endswith("_grid_thw"))
            raise ValueError(f"{name} {[t, h, w]}: h and w must be multiples of the {merge}x{merge} merge")
        return {"tokens": t * h * w // merge**2}

    def encoder_schema(self, modality: str) -> ItemSchema:
        pixels = TensorSpec(_PIXELS[modality], ("t*h*w", self.patch_dim))  # [patches, patch values]
        return ItemSchema(tensors=(pixels, self._grid(modality)), patches="t*h*w", derive=self._tokens)

    def position_schema(self, modality: str) -> ItemSchema:
        return ItemSchema(tensors=(self._grid(modality),), derive=self._tokens)

    def video_token_grid(self, encoder_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        t, h, w = (int(v) for v in encoder_inputs["video_grid_thw"][0])
        return t, h * w // self.spatial_merge_size**2

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   videos: list[Video] = ()) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt", **self.video_processor_kwargs(videos))
        token_ids = out["input_ids"][0].tolist()
        items = [*self._items(processor, out, token_ids, IMAGE, len(images)),
                 *self._items(processor, out, token_ids, VIDEO, len(videos))]
        return ProcessedPrompt(token_ids=token_ids, items=sorted(items, key=lambda item: item.offset))

    def _items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], modality: str,
               count: int) -> list[ProcessedItem]:
        """The items of one modality: one placeholder run each, its patches and grid cut from the batch."""
        runs = self.modality_runs(processor, token_ids, modality)
        grid = f"{modality}_grid_thw"
        grids = out[grid] if count else torch.zeros(0, 3, dtype=torch.long)  # [count, 3]
        self.check_counts(f"{modality}s", [int(g.prod()) // self.spatial_merge_size**2 for g in grids],
                          [n for _, n in runs])
        if not count:
            return []
        inputs = split_items(out, {_PIXELS[modality]: Split.flat("patches"), grid: Split.batched()}, count,
                             sizes={"patches": [int(g.prod()) for g in grids]})
        return [ProcessedItem(modality=modality, offset=offset, length=length, encoder_inputs=item_inputs,
                              position_inputs={grid: item_inputs[grid]})
                for (offset, length), item_inputs in zip(runs, inputs)]

    def modality_runs(self, processor: ProcessorMixin, token_ids: list[int], modality: str) -> list[tuple[int, int]]:
        """(offset, length) of the placeholder runs of `modality`'s items in the prompt: here every run of its
        placeholder token (GLM-V's images and video frames share one token and override this)."""
        return self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, modality))

    @staticmethod
    def tower_features(model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> Any:
        """The tower on the items' patches, concatenated as the processor lays out one prompt's media."""
        device = model.device
        pixel_values = torch.cat([it[_PIXELS[modality]] for it in items]).to(device)  # [all patches, patch values]
        grid_thw = torch.cat([it[f"{modality}_grid_thw"] for it in items]).to(device)  # [items, 3]
        if modality == VIDEO:
            return model.model.get_video_features(pixel_values_videos=pixel_values, video_grid_thw=grid_thw)
        return model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        return [ItemEmbeddings(embeddings=e) for e in self.tower_features(model, modality, items).pooler_output]

    def dropped_video_runs(self, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> list[tuple[int, torch.Tensor]]:
        """EVS: where a pruned video's placeholder runs that lost every token were, with their grids (a
        family whose video is one run per frame group), for the positions of the unpruned prompt; none
        here (a Qwen2-VL video is one run, and keeps its first frame group)."""
        return []

    def rope_index_kwargs(self, videos: list[PlacedEmbeddings]) -> dict[str, Any]:
        """More get_rope_index arguments from the videos' position inputs (in prompt order); none here."""
        return {}

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        prefill = super().prefill_inputs(model, token_ids, placed)
        if not placed:
            return prefill  # text only: plain 1-D positions, as transformers uses
        token_types = torch.zeros_like(token_ids)
        runs = [(item.offset, item.length, item.modality, item.position_inputs[f"{item.modality}_grid_thw"].long(),
                 item.kept) for item in placed]  # grids checked by the LLM
        runs += [(offset, 0, VIDEO, grid, grid.new_zeros(0)) for offset, grid in self.dropped_video_runs(token_ids, placed)]
        grids: dict[str, list[torch.Tensor]] = {IMAGE: [], VIDEO: []}
        pruned = []  # (offset, length, unpruned length, kept) of the EVS-pruned runs
        for offset, length, modality, grid, kept in sorted(runs, key=lambda run: run[0]):
            token_types[offset : offset + length] = _TOKEN_TYPE[modality]
            grids[modality].append(grid)
            if kept is not None:
                pruned.append((offset, length, int(grid.prod()) // self.spatial_merge_size**2, kept))
        # Positions are those of the unpruned prompt: rebuilt, positioned, and the dropped tokens left out.
        if pruned:
            full_ids, present = evs.unpruned_layout(token_ids, pruned, fill=model.config.video_token_id)
            full_types = evs.unpruned_layout(token_types, pruned, fill=_TOKEN_TYPE[VIDEO])[0]
        else:
            full_ids, present, full_types = token_ids, None, token_types
        position_ids, rope_deltas = model.model.get_rope_index(
            full_ids[None],
            mm_token_type_ids=full_types[None],
            image_grid_thw=torch.cat(grids[IMAGE]) if grids[IMAGE] else None,
            video_grid_thw=torch.cat(grids[VIDEO]) if grids[VIDEO] else None,
            **self.rope_index_kwargs([item for item in placed if item.modality == VIDEO]),
        )  # [3, 1, L_full], [1, 1]
        dropped = full_ids.shape[0] - token_ids.shape[0]
        prefill.position_ids = position_ids if present is None else position_ids[:, :, present]
        prefill.rope_delta = int(rope_deltas[0, 0]) + dropped  # decode positions continue the unpruned prompt's
        return prefill
