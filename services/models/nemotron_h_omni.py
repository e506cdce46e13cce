"""Nemotron-H Omni (NemotronH_Omni_Reasoning_V3): a RADIO tower with pixel shuffle for images and video,
a Parakeet (FastConformer) tower for audio, and a hybrid Mamba-2 / attention / MoE language model whose
cache holds conv and SSM state beside the KV cache.

Images are tiled at dynamic resolution by the image processor: each image becomes a grid of
16 x 16 patches (`image_grid_hw` [h, w], both multiples of 2), flattened to `pixel_values`
rows of 3*16*16 values, all images of a prompt concatenated. The tower pixel-shuffles each
image's grid 2x2, so `<image>` expands to `<img>` + `<image>` x (h*w/4) + `</img>`.

A video's frames are resized to one tile each (`pixel_values_videos` [T, 3, H, W]) and the tower
takes them two at a time (`video_temporal_patch_size`): `<video>` expands to one labelled chunk per
pair, "Frame 1 sampled at 0.00 seconds and frame 2 sampled at 0.50 seconds: <img><image>...</img>",
joined by newlines. The chunks use the image token, so a video item is several placeholder runs
(ProcessedItem.runs) whose rows follow one another. The times come from the metadata the processor
is given: the chosen frames' indices (ModelFamily.video_frame_indices), passed as one VideoMetadata,
the form this processor reads (it takes one video per prompt).

An audio clip becomes log-mel features (the processor's ParakeetFeatureExtractor) and
`<so_start>` + `<so_embedding>` x n + `</so_end>`, n the tower's 8x subsampled frames.

The language model has no rotary positions (position comes from the Mamba layers), so plain
1-D positions and the default merge are what transformers does too.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, ProcessorMixin

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.common.video import Video
from services.models.base import AUDIO, IMAGE, VIDEO, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items

Run = tuple[int, int]  # (offset, length) of one placeholder run


class NemotronHOmni(ModelFamily):
    name = "nemotron_h_omni"
    hf_architectures = ("NemotronH_Omni_Reasoning_V3",)
    # Audio needs a checkpoint with an audio tower (audio_config); preprocess refuses it otherwise.
    modalities = (IMAGE, VIDEO, AUDIO)
    # Images: one packed tower pass, each image attending only to itself (as Qwen-VL). Videos and
    # audio clips are encoded one item per tower call, as transformers does for a prompt's one video
    # or one clip, so they are exact in any batch.
    encoder_batching = "tolerance"
    encoder_batch_tolerance = 1e-5

    @property
    def merge_size(self) -> int:
        """Patches merged per side by the pixel shuffle (2 for downsample_ratio 0.5)."""
        return round(1 / self.config.downsample_ratio)

    @property
    def patch_dim(self) -> int:
        """Values in one flattened patch: channels x patch x patch (768 for 16-px RGB patches)."""
        return self.config.vision_config.patch_dim

    @property
    def temporal_patch(self) -> int:
        """Frames the tower takes as one temporal patch (one chunk of video tokens)."""
        return self.config.video_temporal_patch_size

    def placeholder_token(self, modality: str) -> str:
        # Video chunks repeat the image token (the tokenizer's <video> is only the chat's marker).
        return {IMAGE: "<image>", VIDEO: "<image>", AUDIO: "<so_embedding>"}[modality]

    # ---- typed inputs ------------------------------------------------------------------
    def _tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        """The pixel shuffle merges merge x merge patches: both sides must be multiples of it."""
        h, w, merge = bindings["h"], bindings["w"], self.merge_size
        if h % merge or w % merge:
            raise ValueError(f"image_grid_hw {[h, w]} is not a multiple of the {merge}x{merge} pixel shuffle")
        return {"tokens": h * w // merge**2}

    def _video_tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        """Frames of whole merged patches; the tower repeats the last frame to fill the last temporal patch."""
        side = self.config.vision_config.patch_size * self.merge_size
        height, width = bindings["height"], bindings["width"]
        if height % side or width % side:
            raise ValueError(f"pixel_values_videos frames are {height}x{width}; both sides must be multiples of "
                             f"{side} (patch x pixel shuffle)")
        groups = math.ceil(bindings["frames"] / self.temporal_patch)
        patches = groups * (height // side) * (width // side) * self.merge_size**2
        return {"tokens": patches // self.merge_size**2, "patches": patches}

    def _audio_tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        """The tower keeps its subsampling of (real frames + 1): the processor's count of placeholders."""
        mask = item["input_features_mask"][0]
        real = int(mask.sum())
        if not 1 <= real < bindings["frames"] or not bool(mask[:real].all()) or bool(mask[real:].any()):
            raise ValueError(f"input_features_mask must be ones then at least one zero, with at least one "
                             f"one; it has {real} ones in {bindings['frames']} frames")
        return {"tokens": self.audio_tokens(real + 1)}

    def audio_tokens(self, frames: int) -> int:
        """The Parakeet tower's output length for `frames` mel frames (its conv subsampling)."""
        audio = self.config.audio_config
        kernel, stride = audio.subsampling_conv_kernel_size, audio.subsampling_conv_stride
        add_pad = (kernel - 1) // 2 * 2 - kernel
        for _ in range(int(math.log2(audio.subsampling_factor))):
            frames = (frames + add_pad) // stride + 1
        return frames

    def encoder_schema(self, modality: str) -> ItemSchema:
        if modality == VIDEO:  # [frames, channels, height, width], one tile per frame
            channels = self.patch_dim // self.config.vision_config.patch_size**2
            return ItemSchema(tensors=(TensorSpec("pixel_values_videos", ("frames", channels, "height", "width")),),
                              patches="patches", derive=self._video_tokens)
        if modality == AUDIO:  # log-mel frames of one clip, and which are real (1) or the STFT's tail (0)
            if self.config.audio_config is None:
                raise InvalidArgument("this checkpoint has no audio tower (audio_config)", reason="MODALITY_UNSUPPORTED")
            mels = self.config.audio_config.num_mel_bins
            return ItemSchema(tensors=(TensorSpec("input_features", (1, "frames", mels)),
                                       TensorSpec("input_features_mask", (1, "frames"), INT)),
                              derive=self._audio_tokens)
        return ItemSchema(tensors=(
            TensorSpec("pixel_values", ("h*w", self.patch_dim)),  # [patches, patch values]
            TensorSpec("image_grid_hw", (1, 2), INT, values=("h", "w")),  # patches along height, width
        ), patches="h*w", derive=self._tokens)

    # ---- processor ---------------------------------------------------------------------
    @staticmethod
    def video_processor_kwargs(videos: list[Video]) -> dict[str, Any]:
        """Frames chosen already; the metadata as one VideoMetadata (the processor labels the frames with
        its frames_indices, and reads it as a single object: it takes at most one video per prompt)."""
        if not videos:
            return {}
        (video,) = videos
        return {"videos": [video.frames], "video_metadata": video.metadata, "do_sample_frames": False}

    def audio_sampling_rate(self, processor: ProcessorMixin) -> int:
        """The rate the processor tells its feature extractor the clips are at (it never resamples)."""
        return int(processor.audio_sampling_rate)

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   videos: list[Video] = (), audios: list[Audio] = ()) -> ProcessedPrompt:
        self._check_media(processor, text, len(images), videos, audios)
        audio_kwargs = {"audio": [audio.samples for audio in audios]} if audios else {}
        out = processor(text=[text], images=images or None, return_tensors="pt",
                        **self.video_processor_kwargs(videos), **audio_kwargs)
        token_ids = out["input_ids"][0].tolist()
        tokenizer = processor.tokenizer
        image_runs = iter(self.placeholder_runs(token_ids, self.placeholder_token_id(tokenizer, IMAGE)))
        audio_runs = iter(self.placeholder_runs(token_ids, self.placeholder_token_id(tokenizer, AUDIO)))
        images_in, audios_in = iter(self._image_inputs(out, len(images))), iter(self._audio_inputs(processor, out, audios))
        items = []
        # The chat's markers in prompt order tell whose runs are whose: the image token serves both images
        # (one run each) and the video (one run per temporal patch).
        for marker in self._markers(processor, text):
            if marker == processor.image_token:
                inputs = next(images_in)
                run = next(image_runs, (0, 0))
                self.check_counts("images", [self.check_encoder_item(IMAGE, inputs, where="image")["tokens"]], [run[1]])
                items.append(ProcessedItem(modality=IMAGE, offset=run[0], length=run[1], encoder_inputs=inputs))
            elif marker == processor.video_token:
                if videos:  # (else a <video> typed in a text-only prompt: plain text to transformers too)
                    items.append(self._video_item(out["pixel_values_videos"], image_runs))
            else:
                inputs = next(audios_in)
                run = next(audio_runs, (0, 0))
                self.check_counts("audios", [self.check_encoder_item(AUDIO, inputs, where="audio")["tokens"]], [run[1]])
                items.append(ProcessedItem(modality=AUDIO, offset=run[0], length=run[1], encoder_inputs=inputs))
        extra = [run for runs in (image_runs, audio_runs) for run in runs]
        self.check_counts("media", [], [length for _, length in extra])  # runs no item accounts for
        return ProcessedPrompt(token_ids=token_ids, items=items)

    @staticmethod
    def _markers(processor: ProcessorMixin, text: str) -> list[str]:
        """The chat's media markers (<image>, <video>, <so_embedding>) in the order the text has them."""
        tokens = (processor.image_token, processor.video_token, processor.audio_token)
        return re.findall("|".join(map(re.escape, tokens)), text)

    def _check_media(self, processor: ProcessorMixin, text: str, num_images: int, videos: list[Video],
                     audios: list[Audio]) -> None:
        """What the processor would get wrong: several videos (it labels and packs them as one), a marker
        typed in the text (<video> is not among the servicer's reserved tokens), audio without a tower,
        a clip too short to normalize."""
        if len(videos) > 1:
            raise InvalidArgument(f"{len(videos)} videos in one request; the {self.name} processor takes one "
                                  "video per prompt", reason="TOO_MANY_MEDIA_ITEMS",
                                  metadata={"modality": VIDEO, "maxItems": "1"})
        markers = self._markers(processor, text)
        for token, count in ((processor.image_token, num_images), (processor.video_token, len(videos)),
                             (processor.audio_token, len(audios))):
            if markers.count(token) != count and (count or token != processor.video_token):
                # a typed <video> without a video part stays text, as transformers leaves it
                raise InvalidArgument(f"the text contains the reserved token {token}; send media as image, video "
                                      "or audio parts", reason="RESERVED_TOKEN_IN_TEXT")
        if audios and self.config.audio_config is None:
            raise InvalidArgument(f"this {self.name} checkpoint has no audio tower (audio_config); it takes text, "
                                  "image, video", reason="MODALITY_UNSUPPORTED")
        # The feature extractor normalizes each mel bin over the clip's frames (sample variance): two at least.
        shortest = 2 * processor.feature_extractor.hop_length
        for index, audio in enumerate(audios):
            if audio.samples.size < shortest:
                raise InvalidArgument(f"audio clip {index} has {audio.samples.size} samples at {audio.sampling_rate} "
                                      f"Hz; this model needs at least {shortest} (two mel frames)",
                                      reason="AUDIO_TOO_SHORT")

    def _image_inputs(self, out: Any, count: int) -> list[dict[str, torch.Tensor]]:
        if not count:
            return []
        grids = out["image_grid_hw"].tolist()  # [num_images] x (h, w) in patches
        return split_items(out, {"pixel_values": Split.flat("patches"), "image_grid_hw": Split.batched()}, count,
                           sizes={"patches": [h * w for h, w in grids]})

    def _audio_inputs(self, processor: ProcessorMixin, out: Any, audios: list[Audio]) -> list[dict[str, torch.Tensor]]:
        """Each clip's own frames (1 + samples // hop, what its STFT makes alone), cut from the batch the
        feature extractor padded to the longest clip; the mask as integers (the encoder takes no bools)."""
        if not audios:
            return []
        hop = processor.feature_extractor.hop_length
        frames = [1 + audio.samples.size // hop for audio in audios]
        batch = {"input_features": out["input_features"], "input_features_mask": out["input_features_mask"].long()}
        return split_items(batch, {"input_features": Split.padded("frames"), "input_features_mask": Split.padded("frames")},
                           len(audios), sizes={"frames": frames})

    # ---- EVS (services/models/evs.py): transformers' forward prunes by the same rule at the checkpoint's
    # `video_pruning_rate`, each frame group a run behind its label, with 1-D positions ----------------
    supports_video_pruning = True

    @property
    def default_video_pruning_rate(self) -> float:
        return float(getattr(self.config, "video_pruning_rate", 0.0) or 0.0)

    def video_token_grid(self, encoder_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        bindings = self.check_encoder_item(VIDEO, encoder_inputs, where="video")
        groups = math.ceil(bindings["frames"] / self.temporal_patch)
        return groups, bindings["tokens"] // groups

    def _video_item(self, pixel_values_videos: torch.Tensor, image_runs: Any) -> ProcessedItem:
        """The video's item: one run per temporal patch of its frames (taken from `image_runs`), each as
        long as one frame tile's tokens, their rows one after another."""
        inputs = {"pixel_values_videos": pixel_values_videos}  # [T, 3, H, W]: the prompt's one video
        bindings = self.check_encoder_item(VIDEO, inputs, where="video")
        groups = math.ceil(bindings["frames"] / self.temporal_patch)
        runs = [next(image_runs, (0, 0)) for _ in range(groups)]
        self.check_counts("video frames", [bindings["tokens"] // groups] * groups, [length for _, length in runs])
        return ProcessedItem(modality=VIDEO, offset=runs[0][0], length=bindings["tokens"], encoder_inputs=inputs,
                             runs=tuple(runs))

    # ---- encoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        device = model.device
        if modality == VIDEO:  # one video per call, as the model's forward takes a prompt's video
            return [ItemEmbeddings(embeddings=model.get_video_features(
                item["pixel_values_videos"].to(device)).pooler_output.flatten(0, 1)) for item in items]
        if modality == AUDIO:  # each clip alone: unpadded, as transformers encodes a prompt's one clip
            return [ItemEmbeddings(embeddings=model.get_audio_features(
                item["input_features"].to(device), item["input_features_mask"].to(device).bool()).pooler_output)
                for item in items]
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(device)  # [total_patches, patch_dim]
        grid_hw = torch.cat([it["image_grid_hw"] for it in items]).to(device).long()  # [num_images, 2]
        # As the model's forward: one packed tower pass (each image attends only to itself),
        # per-image pixel shuffle, projector; pooler_output holds one [h*w/4, hidden] per image.
        out = model.get_image_features(pixel_values=pixel_values, image_grid_hw=grid_hw)
        return [ItemEmbeddings(embeddings=e) for e in out.pooler_output]

    def strip_for_encoder(self, model: PreTrainedModel) -> None:
        model.language_model = None

    # ---- llm ---------------------------------------------------------------------------
    def strip_for_llm(self, model: PreTrainedModel) -> None:
        model.vision_model = None
        model.vision_final_layernorm = None
        model.multi_modal_projector = None
        model.audio_tower = None
        model.embed_audio = None

    def new_cache(self, model: PreTrainedModel) -> Cache:
        """The cache generate() makes for this model: one layer per hybrid block, a conv + SSM state
        layer for each Mamba block, a KV layer for each attention block, none for MoE/MLP blocks.

        Its get_seq_length() reads the first attention layer, so the engine's decode bookkeeping holds.
        """
        return DynamicCache(config=self.config.get_text_config(decoder=True))

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.language_model.model  # NemotronHModel inside NemotronHForCausalLM

    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.language_model.lm_head
