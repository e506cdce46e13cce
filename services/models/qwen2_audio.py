"""Qwen2-Audio: a Whisper-style audio encoder, a linear projector, a Qwen2 language model. Audio only.

transformers (Qwen2AudioModel.forward): the WhisperFeatureExtractor pads every clip to 30 s (3000
frames of 128-bin log-mel; it cuts longer clips there, which the family refuses instead) with a `feature_attention_mask` of the clip's
own frames. The encoder runs the whole 3000 frames of every clip, its attention masked to the clip's
frames after the stride-2 convolution; after a 2x average pool the first
`((frames - 1) // 2 + 1 - 2) // 2 + 1` rows, projected, are the clip's embeddings, written in order
over the `<|AUDIO|>` tokens (the processor expands one per clip to that count). No scaling; the
language model takes 1-D positions.

Split here:
  processor  each clip's `input_features` [1, 128, 3000] and `feature_attention_mask` [1, 3000], its
             run of `<|AUDIO|>` (runs are apart: the template wraps each in audio_bos/eos).
  encoder    the tower on a batch of clips exactly as the whole model runs a prompt's; each clip's rows
             depend on its own frames only (masked attention, per-row convolutions).
  llm        the default prefill: rows written over each item's range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForMultimodalLM, PreTrainedModel, ProcessorMixin
from transformers.masking_utils import create_bidirectional_mask

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.models.base import AUDIO, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items

_FEATURES, _MASK = "input_features", "feature_attention_mask"


class Qwen2Audio(ModelFamily):
    name = "qwen2_audio"
    hf_architectures = ("Qwen2AudioForConditionalGeneration",)
    modalities = (AUDIO,)
    # Clips are rows of one batch, each masked to its own frames; tests/encoder/test_batch_claims.py
    # measures the rows batched vs alone (GEMMs over more rows may block differently).
    encoder_batching = "tolerance"
    encoder_batch_tolerance = 1e-5
    tower_attributes = ("audio_tower", "multi_modal_projector")

    @property
    def mel_bins(self) -> int:
        return self.config.audio_config.num_mel_bins

    @property
    def frames(self) -> int:
        """Feature frames the encoder takes per clip: its position table after the stride-2 convolution
        (3000 for 30 s)."""
        return self.config.audio_config.max_source_positions * 2

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, path: Path, dtype: torch.dtype, device: str) -> PreTrainedModel:
        # Not an image-text-to-text model for transformers' Auto classes: the multimodal LM one maps it.
        return AutoModelForMultimodalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    # ---- processor ---------------------------------------------------------------------
    def placeholder_token(self, modality: str) -> str:
        return {AUDIO: "<|AUDIO|>"}[modality]

    def render_chat(self, processor: ProcessorMixin, messages: list[dict[str, Any]]) -> str:
        """The chat template recognises a clip by an `audio` key in its part (the released checkpoints'
        template tests only that; transformers' also tests the type): audio parts get one."""
        marked = [message if isinstance(message["content"], str) else
                  {**message, "content": [{**part, AUDIO: ""} if part.get("type") == AUDIO else part
                                          for part in message["content"]]}
                  for message in messages]
        return super().render_chat(processor, marked)

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   audios: list[Audio] = ()) -> ProcessedPrompt:
        audio_kwargs = {}
        if audios:
            check_clips(processor, audios, min_tokens=2)  # one token takes transformers' legacy path, which fails
            audio_kwargs = {"audio": [audio.samples for audio in audios], "sampling_rate": audios[0].sampling_rate}
        out = processor(text=[text], return_tensors="pt", **audio_kwargs)
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, AUDIO))
        if not audios:
            self.check_counts("audios", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=[])
        inputs = split_items(out, {_FEATURES: Split.batched(), _MASK: Split.batched()}, len(audios))
        lengths = [num_audio_tokens(int(item[_MASK].sum())) for item in inputs]
        self.check_counts("audios", lengths, [n for _, n in runs])
        items = [ProcessedItem(modality=AUDIO, offset=offset, length=length, encoder_inputs=item_inputs)
                 for (offset, length), item_inputs in zip(runs, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- typed inputs ------------------------------------------------------------------
    @staticmethod
    def _tokens(item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        return {"tokens": num_audio_tokens(valid_frames(item[_MASK][0]))}

    def encoder_schema(self, modality: str) -> ItemSchema:
        return ItemSchema(tensors=(
            TensorSpec(_FEATURES, (1, self.mel_bins, self.frames)),  # log-mel, padded to 30 s
            TensorSpec(_MASK, (1, self.frames), INT),  # 1 on the clip's frames
        ), patches=str(self.frames), derive=self._tokens)

    # ---- encoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        """The tower and projector on the clips as one batch, as Qwen2AudioModel.forward runs a prompt's."""
        if not items:
            return []
        tower = model.model.audio_tower
        device = tower.device
        features = torch.cat([item[_FEATURES] for item in items]).to(device)  # [B, mel, frames]
        frame_mask = torch.cat([item[_MASK] for item in items]).to(device)  # [B, frames]
        conv_lengths, token_lengths = tower._get_feat_extract_output_lengths(frame_mask.sum(-1))
        positions = (features.shape[-1] - 2) // 2 + 1  # after the stride-2 convolution
        valid = torch.arange(positions, device=device)[None] < conv_lengths[:, None]  # [B, positions]
        dummy = torch.zeros(len(items), positions, 1, dtype=model.dtype, device=device)
        attention_mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy,
                                                   attention_mask=valid.long())
        hidden = tower(features, attention_mask=attention_mask).last_hidden_state
        rows = model.model.multi_modal_projector(hidden)  # [B, positions // 2, hidden]
        return [ItemEmbeddings(embeddings=rows[i, : int(n)]) for i, n in enumerate(token_lengths)]


# ---- shared with Qwen2.5-Omni's thinker (the same feature extractor and token count) ---------------
def num_audio_tokens(valid_frames: int) -> int:
    """Embedding rows of a clip of `valid_frames`: the stride-2 convolution, then the 2x pool
    (Qwen2AudioEncoder._get_feat_extract_output_lengths; the processor counts the same)."""
    return ((valid_frames - 1) // 2 + 1 - 2) // 2 + 1


def valid_frames(mask: torch.Tensor) -> int:
    """The clip's frames in its `feature_attention_mask` row, which must be 1 on its first frames (at
    least one) and 0 after them, as the feature extractor makes it; ValueError otherwise."""
    valid = int((mask != 0).sum())
    if valid == 0 or not bool((mask[:valid] == 1).all()) or bool(mask[valid:].any()):
        raise ValueError(f"{_MASK} must be 1 on the clip's first frames (at least one) and 0 after them")
    return valid


def check_clips(processor: ProcessorMixin, audios: list[Audio], min_tokens: int) -> None:
    """What the WhisperFeatureExtractor would do wrong, refused first: it keeps the first 30 s of a clip
    and drops the rest without a word (transformers' truncation); and a clip too short for `min_tokens`
    embedding rows has none to place (or, Qwen2-Audio with one, fails inside transformers)."""
    extractor = processor.feature_extractor
    for index, audio in enumerate(audios):
        if len(audio.samples) > extractor.n_samples:
            raise InvalidArgument(
                f"audio {index} lasts {audio.seconds:.1f} s; this model hears at most {extractor.chunk_length} s "
                "per clip: cut it into clips", reason="AUDIO_TOO_LONG",
                metadata={"maxAudioSeconds": str(extractor.chunk_length)})
        frames = -(-len(audio.samples) // extractor.hop_length)  # the feature extractor's mask, per hop
        if num_audio_tokens(frames) < min_tokens:
            shortest = next(n for n in range(1, 64) if num_audio_tokens(n) >= min_tokens) * extractor.hop_length
            raise InvalidArgument(
                f"audio {index} lasts {audio.seconds * 1000:.0f} ms, {num_audio_tokens(frames)} embedding rows; this "
                f"model needs at least {min_tokens} ({shortest * 1000 // audio.sampling_rate} ms)",
                reason="AUDIO_TOO_SHORT")
