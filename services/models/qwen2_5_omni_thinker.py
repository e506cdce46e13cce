"""Qwen2.5-Omni's thinker: Qwen2.5-VL's images and mRoPE, plus audio (text out; the talker is not served).

transformers (Qwen2_5OmniThinkerModel.forward): images as in Qwen2.5-VL (`get_image_features`, one
`<|IMAGE|>` run per image between vision bos/eos). Audio: the WhisperFeatureExtractor pads each clip
to 30 s with a `feature_attention_mask`; `get_audio_features` keeps each clip's own frames, encodes
them in chunks of 2 x n_window frames (attention within a chunk), pools 2x and projects, giving
`((frames - 1) // 2 + 1 - 2) // 2 + 1` rows per clip, written in order over the `<|AUDIO|>` tokens.
Positions: `get_rope_index` over the whole prompt, given the images' grids and the clips' frame
counts (audio tokens advance all three axes together, images by grid); 3-D mRoPE only when the
prompt has an image, else plain positions.

Split here:
  processor  images: Qwen2-VL's items. Clips: `input_features` [1, 128, 3000] and
             `feature_attention_mask` [1, 3000] each; position input `audio_feature_lengths` [1].
  encoder    images: Qwen2-VL's path; clips: `get_audio_features` on a batch of clips (each clip's
             chunks attend only within themselves, so items stay independent).
  llm        rows written over each range; positions from `get_rope_index` with the grids and lengths.

Videos are not served: with audio they interleave by 2 s chunks (use_audio_in_video), and their
positions need second-per-grid. A clip over 30 s is refused (the feature extractor would cut it), and one
too short for an embedding row (under 30 ms; transformers would drop its placeholder).
Only the thinker's own architecture is claimed: a full Qwen2.5-Omni checkpoint (thinker, talker,
vocoder) is a different folder layout.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin

from services.common.audio import Audio
from services.models.base import (
    AUDIO,
    IMAGE,
    ItemEmbeddings,
    ModelFamily,
    PlacedEmbeddings,
    PrefillInputs,
    ProcessedItem,
    ProcessedPrompt,
)
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items
from services.models.qwen2_audio import check_clips, num_audio_tokens, valid_frames
from services.models.qwen2_vl import Qwen2VL

_FEATURES, _MASK, _LENGTHS = "input_features", "feature_attention_mask", "audio_feature_lengths"


class Qwen2_5OmniThinker(Qwen2VL):
    name = "qwen2_5_omni_thinker"
    hf_architectures = ("Qwen2_5OmniThinkerForConditionalGeneration",)
    modalities = (IMAGE, AUDIO)
    tower_attributes = ("visual", "audio_tower")

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|IMAGE|>", AUDIO: "<|AUDIO|>"}[modality]

    @property
    def frames(self) -> int:
        """Feature frames per clip as the feature extractor pads them (30 s)."""
        return self.config.audio_config.max_source_positions * 2

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   audios: list[Audio] = ()) -> ProcessedPrompt:
        audio_kwargs = {}
        if audios:
            check_clips(processor, audios, min_tokens=1)
            audio_kwargs = {"audio": [audio.samples for audio in audios], "sampling_rate": audios[0].sampling_rate}
        out = processor(text=[text], images=images or None, return_tensors="pt", **audio_kwargs)
        token_ids = out["input_ids"][0].tolist()
        items = [*self._items(processor, out, token_ids, IMAGE, len(images)),
                 *self._audio_items(processor, out, token_ids, len(audios))]
        return ProcessedPrompt(token_ids=token_ids, items=sorted(items, key=lambda item: item.offset))

    def _audio_items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], count: int) -> list[ProcessedItem]:
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, AUDIO))
        if not count:
            self.check_counts("audios", [], [n for _, n in runs])
            return []
        inputs = split_items(out, {_FEATURES: Split.batched(), _MASK: Split.batched()}, count)
        lengths = [num_audio_tokens(int(item[_MASK].sum())) for item in inputs]
        self.check_counts("audios", lengths, [n for _, n in runs])
        return [ProcessedItem(modality=AUDIO, offset=offset, length=length, encoder_inputs=item,
                              position_inputs={_LENGTHS: item[_MASK].sum(-1).long()})
                for (offset, length), item in zip(runs, inputs)]

    # ---- typed inputs ------------------------------------------------------------------
    @staticmethod
    def _audio_tokens(item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        return {"tokens": num_audio_tokens(valid_frames(item[_MASK][0]))}

    def encoder_schema(self, modality: str) -> ItemSchema:
        if modality != AUDIO:
            return super().encoder_schema(modality)
        mel = self.config.audio_config.num_mel_bins
        return ItemSchema(tensors=(
            TensorSpec(_FEATURES, (1, mel, self.frames)),  # log-mel, padded to 30 s
            TensorSpec(_MASK, (1, self.frames), INT),  # 1 on the clip's frames
        ), patches=str(self.frames), derive=self._audio_tokens)

    def position_schema(self, modality: str) -> ItemSchema:
        if modality != AUDIO:
            return super().position_schema(modality)
        return ItemSchema(tensors=(TensorSpec(_LENGTHS, (1,), INT, values=("frames",)),),
                          derive=lambda item, b: {"tokens": num_audio_tokens(b["frames"])})

    # ---- encoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        if modality != AUDIO:
            return super().encode(model, modality, items)
        if not items:
            return []
        device = model.device
        features = torch.cat([item[_FEATURES] for item in items]).to(device)  # [B, mel, frames]
        mask = torch.cat([item[_MASK] for item in items]).to(device)  # [B, frames]
        rows = model.model.get_audio_features(features, feature_attention_mask=mask).last_hidden_state  # [sum, H]
        lengths = [num_audio_tokens(int(n)) for n in mask.sum(-1)]
        return [ItemEmbeddings(embeddings=r) for r in rows.split(lengths)]

    # ---- llm ---------------------------------------------------------------------------
    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        prefill = ModelFamily.prefill_inputs(self, model, token_ids, placed)  # rows written over; no Qwen2-VL mRoPE
        if not placed:
            return prefill  # text only: plain 1-D positions, as transformers' equal 3-D ones
        grids = [item.position_inputs["image_grid_thw"].long() for item in placed if item.modality == IMAGE]
        lengths = [item.position_inputs[_LENGTHS].long() for item in placed if item.modality == AUDIO]
        position_ids, rope_deltas = model.model.get_rope_index(
            token_ids[None],
            image_grid_thw=torch.cat(grids) if grids else None,
            video_grid_thw=None,
            attention_mask=torch.ones_like(token_ids)[None],
            use_audio_in_video=False,
            audio_seqlens=torch.cat(lengths) if lengths else None,
        )  # [3, 1, L], [1, 1]
        prefill.position_ids = position_ids
        prefill.rope_delta = int(rope_deltas[0, 0])
        return prefill

