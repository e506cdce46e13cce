"""Phi-4-multimodal: HD crops plus a global view per image, embedded inside the model's embedding module.

transformers runs the towers inside `Phi4MultimodalModel.embed_tokens_extend` (a
Phi4MultimodalFeatureEmbedding) when it is given `input_ids`: the image embedding encodes every
448x448 crop, pools 2x2, lays the crops out as one grid with a learned separator after every row,
puts a learned separator and the global view (16x16 tokens + a separator per row) after it, projects
(Linear, GELU, Linear) and `index_put`s the rows over the `<|image|>` positions in prompt order. No
scaling. The language model is `Phi4MultimodalModel` itself given `inputs_embeds` (then it skips the
embedding module), with 1-D positions.

Split here:
  processor  one `<|image|>` per image in the chat template; the HF processor expands it to the
             image's token count. Two images in one message give ONE run of placeholders (the
             template puts nothing between them), so items are cut from the runs by their counts.
  encoder    per item: its own crops (the processor pads every image to the batch's largest crop
             count; the padding crops are not sent), its `image_sizes` and crop masks. All items of
             an Encode call (the processor sends a request's images in one) are padded back exactly
             as the HF processor pads them and run in ONE call of the HF image embedding module.
  llm        the default prefill: rows written over each item's range (HF's index_put, in order).

The batch matters (transformers 5.23): `Phi4MultimodalVisionAttention.is_causal` is True. When no
patch of any crop in the prompt's padded crop batch is masked (e.g. one image that fits its crop grid
exactly, like a square one), the tower passes no mask and SDPA/flash attention go causal; with any
masked patch in the batch they are bidirectional. So transformers' features of an image depend on
the other images of its request. We reproduce that bug (the request-level batch above), as the
tokens must be transformers'. Consequence: an embedding cache keyed per item (mm_hash) must not be
shared across requests for this family until transformers fixes it. A fix makes
tests/models/test_phi4mm.py::test_transformers_attention_paths_differ fail (and, end to end, the
last assertion of tests/e2e/test_phi4mm_parity.py::test_unpadded_image_takes_transformers_causal_path).

Audio: one `<|audio|>` per clip, expanded by the processor to `audio_embed_sizes` tokens (80-bin
log-mel frames at 100 per second, ceil-divided by the compression rate, 8). transformers' audio
embedding runs the conformer on the request's clips as one batch, padded to the longest (with a
frame mask only when there are several), then projects with `*_for_speech` layers, or with
`*_for_vision_speech` ones when the prompt also has images. So an audio item's embeddings depend on
its request twice: the padding (its features are sent padded exactly as the processor padded them,
the edge frame included, and all audio items of a call run as one batch: "alone" as for images) and
the modality mix (each item carries `audio_projection_mode`, 0 speech or 1 vision, and its mm_hash
gets the mode as `hash_context`, so no cache serves one mode's rows for the other). With several
clips their places join the hash too: the same clip twice is then two items, batched as transformers
batches them, not one deduplicated item encoded alone.

Real checkpoints ship `vision-lora/` and `speech-lora/` adapters that transformers only applies when
the caller loads them (`model.load_adapter`); like transformers without them, the base weights are
served here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, ProcessorMixin

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.models.base import AUDIO, IMAGE, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items

# The per-item encoder inputs, as the HF processor names them.
_PIXELS, _SIZES, _MASK = "image_pixel_values", "image_sizes", "image_attention_mask"
_FEATURES, _EMBED_SIZES = "audio_input_features", "audio_embed_sizes"
# Ours: the item's valid feature frames (its row of the processor's audio_attention_mask, summed; all
# frames when the request has one clip), and the projection transformers picks for the whole prompt.
_FRAMES, _MODE = "audio_frames", "audio_projection_mode"
_SPEECH, _VISION = 0, 1  # audio_projection_mode values: transformers' "speech" and "vision"


class Phi4Multimodal(ModelFamily):
    name = "phi4mm"
    hf_architectures = ("Phi4MultimodalForCausalLM",)
    modalities = (IMAGE, AUDIO)
    # The request's padded crop batch decides the tower's attention, its padded clips the audio
    # conformer's (module docstring).
    encoder_batching = "alone"

    @property
    def crop_size(self) -> int:
        return self.config.vision_config.crop_size

    @property
    def patches_per_crop_side(self) -> int:
        return self.config.vision_config.image_size // self.config.vision_config.patch_size

    @property
    def tokens_per_crop_side(self) -> int:
        """Tokens along one side of a crop after the 2x2 average pool (16 for 448 px / 14 px patches)."""
        return (self.patches_per_crop_side + 1) // 2  # odd patch grids are padded by one first

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, path: Path, dtype: torch.dtype, device: str) -> PreTrainedModel:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

    # ---- processor ---------------------------------------------------------------------
    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image|>", AUDIO: "<|audio|>"}[modality]

    def num_image_tokens(self, crop_masks: torch.Tensor, image_size: torch.Tensor) -> int:
        """Embedding rows of one image: what the HF image embedding writes, and the processor counts.

        `crop_masks` [1 + crops, P, P] is the global view's patch mask (all valid), then each crop's
        (P patches a side); `image_size` [2] the HD canvas (height, width) in pixels, a whole number of
        crops a side. Laid out as one grid, the crops' valid patches must be one rectangle from the
        top-left corner (the processor pads only right and bottom, in whole patches); its size after
        the 2x2 pool gives the rows. Raises ValueError otherwise (the schema reports it).
        """
        t, s, p = self.tokens_per_crop_side, self.crop_size, self.patches_per_crop_side
        height, width = (int(x) for x in image_size)
        if height <= 0 or width <= 0 or height % s or width % s:
            raise ValueError(f"image_sizes {[height, width]} is not a positive multiple of the {s} px crop")
        rows, cols = height // s, width // s  # crops down and across
        if tuple(crop_masks.shape) != (1 + rows * cols, p, p):
            raise ValueError(f"image_attention_mask of shape {list(crop_masks.shape)}; image_sizes "
                             f"{[height, width]} needs [{1 + rows * cols}, {p}, {p}]")
        grid = crop_masks[1:].reshape(rows, cols, p, p).transpose(1, 2).reshape(rows * p, cols * p)
        valid_h, valid_w = int(grid[:, 0].sum()), int(grid[0, :].sum())  # in patches
        rectangle = torch.zeros_like(grid)
        rectangle[:valid_h, :valid_w] = 1
        if not (crop_masks[0] == 1).all() or not torch.equal(grid, rectangle) or valid_h == 0 or valid_w == 0:
            raise ValueError("image_attention_mask: the global view must be all valid and the crops' valid "
                             "patches one rectangle from the top-left corner")
        useful_h, useful_w = (valid_h + 1) // 2, (valid_w + 1) // 2  # the model keeps every second patch
        global_rows = t * t + t  # the global view, a separator after each of its t rows
        return useful_h * useful_w + useful_h + 1 + global_rows  # crops, their row separators, 1 separator

    def audio_sampling_rate(self, processor: ProcessorMixin) -> int:
        return int(processor.audio_processor.sampling_rate)  # Phi4MultimodalProcessor has no feature_extractor

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   audios: list[Audio] = ()) -> ProcessedPrompt:
        audio_kwargs = {}
        if audios:
            _check_clip_lengths(processor, audios)
            audio_kwargs = {"audio": [audio.samples for audio in audios], "sampling_rate": audios[0].sampling_rate}
        out = processor(text=[text], images=images or None, return_tensors="pt", **audio_kwargs)
        token_ids = out["input_ids"][0].tolist()
        items = [*self._image_items(processor, out, token_ids, len(images)),
                 *self._audio_items(processor, out, token_ids, len(audios), with_images=bool(images))]
        return ProcessedPrompt(token_ids=token_ids, items=sorted(items, key=lambda item: item.offset))

    def _image_items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], count: int) -> list[ProcessedItem]:
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        if not count:
            self.check_counts("images", [], [n for _, n in runs])
            return []
        sizes = out[_SIZES]  # [N, 2] HD canvas (height, width) in pixels
        crops = [1 + (int(h) // self.crop_size) * (int(w) // self.crop_size) for h, w in sizes]  # the global view first
        # The processor pads every image to the batch's most crops (pixels [N, C, 3, S, S], masks [N, C, P, P]):
        # each item keeps its own crops, [1, C_i, ...].
        splits = {_PIXELS: Split.padded("crops"), _SIZES: Split.batched(), _MASK: Split.padded("crops")}
        inputs = split_items(out, splits, count, sizes={"crops": crops})
        lengths = [self.num_image_tokens(item[_MASK][0], item[_SIZES][0]) for item in inputs]
        return [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=encoder_inputs)
                for (offset, length), encoder_inputs in zip(self.cut_runs("images", runs, lengths), inputs)]

    def _audio_items(self, processor: ProcessorMixin, out: Any, token_ids: list[int], count: int, *,
                     with_images: bool) -> list[ProcessedItem]:
        """One item per clip: its features as padded in the request's batch, valid frames, tokens, projection."""
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, AUDIO))
        if not count:
            self.check_counts("audios", [], [n for _, n in runs])
            return []
        inputs = split_items(out, {_FEATURES: Split.batched(), _EMBED_SIZES: Split.batched()}, count)
        features = out[_FEATURES]  # [N, T, mel], padded to the longest clip (the edge frame included)
        mask = out.get("audio_attention_mask")  # [N, T] bool; only when N > 1
        frames = mask.sum(1) if mask is not None else torch.full((count,), features.shape[1])
        mode = _VISION if with_images else _SPEECH
        for item, valid in zip(inputs, frames):
            item[_FRAMES] = valid.reshape(1).long()
            item[_MODE] = torch.tensor([mode])
        lengths = [int(item[_EMBED_SIZES][0]) for item in inputs]
        return [ProcessedItem(modality=AUDIO, offset=offset, length=length, encoder_inputs=encoder_inputs,
                              hash_context=_audio_hash_context(mode, index, count))
                for index, ((offset, length), encoder_inputs)
                in enumerate(zip(self.cut_runs("audios", runs, lengths), inputs))]

    @staticmethod
    def cut_runs(what: str, runs: list[tuple[int, int]], lengths: list[int]) -> list[tuple[int, int]]:
        """(offset, length) of each item, in order, cut from the placeholder runs.

        Items of adjacent media share one run (`<|image|><|image|>` expands to one block); each item
        must still lie inside one run, and together they must fill the runs exactly.
        """
        ranges: list[tuple[int, int]] = []
        pending = list(lengths)
        filled = True  # every run so far is exactly covered by whole items
        for offset, run_length in runs:
            end = offset + run_length
            while offset < end and pending and offset + pending[0] <= end:
                ranges.append((offset, pending[0]))
                offset += pending.pop(0)
            if offset != end:
                filled = False
                break
        if pending or not filled:
            raise InvalidArgument(
                f"{what}: the processor made placeholder runs of {[n for _, n in runs]} tokens, the items need "
                f"{lengths} in this order", reason="PLACEHOLDER_COUNT_MISMATCH")
        return ranges

    # ---- encoder -----------------------------------------------------------------------
    def strip_for_encoder(self, model: PreTrainedModel) -> None:
        """Keeps `embed_tokens_extend` (the towers and their projections); drops the decoder."""
        model.model.layers = torch.nn.ModuleList()
        model.model.embed_tokens = None
        model.lm_head = None

    @property
    def audio_compression(self) -> tuple[int, int]:
        """Feature frames per audio token: the conformer's time reduction, then the downsample (8, 1)."""
        audio = self.config.audio_config
        return audio.time_reduction, audio.downsample_rate

    def num_audio_tokens(self, valid_frames: int) -> int:
        """Embedding rows of a clip of `valid_frames` feature frames (the feature extractor's
        `_compute_audio_embed_size`: a ceil division by each rate in turn)."""
        tokens = valid_frames
        for rate in self.audio_compression:
            tokens = -(-tokens // rate)
        return tokens

    def _tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        return {"tokens": self.num_image_tokens(item[_MASK][0], item[_SIZES][0])}  # checks sizes against crops too

    def _audio_tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        frames, valid, tokens = bindings["frames"], bindings["valid"], bindings["tokens"]
        if valid > frames:
            raise ValueError(f"{_FRAMES} is {valid}, more than the {frames} frames of {_FEATURES}")
        if tokens != self.num_audio_tokens(valid):
            raise ValueError(f"{_EMBED_SIZES} is {tokens}; {valid} valid frames make {self.num_audio_tokens(valid)}")
        if int(item[_MODE][0]) not in (_SPEECH, _VISION):
            raise ValueError(f"{_MODE} is {int(item[_MODE][0])}, expected {_SPEECH} (speech) or {_VISION} (vision)")
        return {}

    def encoder_schema(self, modality: str) -> ItemSchema:
        if modality == AUDIO:
            return ItemSchema(tensors=(
                TensorSpec(_FEATURES, (1, "frames", self.config.audio_config.input_size)),  # log-mel, padded
                TensorSpec(_FRAMES, (1,), INT, values=("valid",)),  # the clip's own frames
                TensorSpec(_EMBED_SIZES, (1,), INT, values=("tokens",)),  # its embedding rows
                TensorSpec(_MODE, (1,), INT),  # 0 speech, 1 vision (the prompt has images)
            ), patches="frames", derive=self._audio_tokens)
        s, p = self.crop_size, self.patches_per_crop_side
        return ItemSchema(tensors=(
            TensorSpec(_PIXELS, (1, "crops", 3, s, s)),  # the global view, then the HD crops
            TensorSpec(_SIZES, (1, 2), INT, values=("height", "width")),  # the HD canvas in pixels
            TensorSpec(_MASK, (1, "crops", p, p)),  # 1.0 on the valid patches of each crop
        ), patches=f"crops*{p * p}", derive=self._tokens)

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        """All items in ONE call of HF's image or audio embedding, padded as the HF processor pads a prompt's.

        The processor sends every item of a request in one Encode call, in prompt order, so this is the
        batch transformers' whole model builds for the request (see the module docstring: the batch
        decides the towers' attention in transformers 5.23).
        """
        if not items:
            return []
        if modality == AUDIO:
            return [ItemEmbeddings(embeddings=r) for r in self._encode_audio(model, items)]
        lengths = [self.num_image_tokens(item[_MASK][0], item[_SIZES][0]) for item in items]
        image_embed = model.model.embed_tokens_extend.image_embed
        max_crops = max(item[_PIXELS].shape[1] for item in items)
        pixels = torch.cat([_pad_crops(item[_PIXELS], max_crops, 0) for item in items])  # [B, C, 3, S, S]
        masks = torch.cat([_pad_crops(item[_MASK], max_crops, 1) for item in items])  # [B, C, P, P]
        sizes = torch.cat([item[_SIZES] for item in items])  # [B, 2]: never padded
        rows = self._embed_images(model, image_embed, pixels, sizes, masks, lengths)
        return [ItemEmbeddings(embeddings=r) for r in rows]

    def _encode_audio(self, model: PreTrainedModel, items: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The call's clips as one batch of HF's audio embedding, as `Phi4MultimodalFeatureEmbedding` runs a
        prompt's: features zero-padded to the longest, the frame mask passed only for several clips (or a
        padded one). Each projection mode runs the whole batch, and each item keeps its own mode's rows:
        one run, exactly transformers', whenever the items agree (the processor's always do)."""
        device = model.device
        frames = max(item[_FEATURES].shape[1] for item in items)
        features = torch.cat([torch.nn.functional.pad(item[_FEATURES], (0, 0, 0, frames - item[_FEATURES].shape[1]))
                              for item in items]).to(device)  # [B, T, mel]
        valid = torch.cat([item[_FRAMES] for item in items]).to(device)  # [B]
        mask = None
        if len(items) > 1 or int(valid[0]) < frames:
            mask = torch.arange(frames, device=device)[None] < valid[:, None]  # [B, T]
        sizes = torch.cat([item[_EMBED_SIZES] for item in items]).to(device)  # [B]
        lengths = [int(n) for n in sizes]
        modes = [int(item[_MODE][0]) for item in items]
        audio_embed = model.model.embed_tokens_extend.audio_embed
        total = sum(lengths)
        input_ids = torch.full((1, total), self.config.audio_config.audio_token_id, dtype=torch.long, device=device)
        canvas = torch.zeros(1, total, self.hidden_size, dtype=model.dtype, device=device)
        rows: list[torch.Tensor | None] = [None] * len(items)
        for mode in sorted(set(modes)):
            # The module writes its rows over the audio-token positions: a prompt of only those gives the rows.
            out = audio_embed(input_ids, canvas, audio_input_features=features, audio_embed_sizes=sizes,
                              audio_attention_mask=mask,
                              audio_projection_mode="vision" if mode == _VISION else "speech")  # [1, total, hidden]
            for index, part in enumerate(out[0].split(lengths)):
                if modes[index] == mode:
                    rows[index] = part
        return rows  # type: ignore[return-value]

    def _embed_images(self, model: PreTrainedModel, image_embed: torch.nn.Module, pixels: torch.Tensor,
                      sizes: torch.Tensor, masks: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
        """Runs HF's image embedding on one padded batch of images; one [rows, hidden] tensor per image.

        The module writes its rows over the image-token positions of `input_ids`: given a prompt
        that is nothing but those positions, its output is exactly the rows, in image order.
        """
        device, dtype = model.device, model.dtype
        total = sum(lengths)
        input_ids = torch.full((1, total), self.config.vision_config.image_token_id, dtype=torch.long, device=device)
        canvas = torch.zeros(1, total, self.hidden_size, dtype=dtype, device=device)
        rows = image_embed(input_ids, canvas, image_pixel_values=pixels.to(device), image_sizes=sizes.to(device),
                           image_attention_mask=masks.to(device))  # [1, total, hidden]
        return list(rows[0].split(lengths))

    # ---- llm ---------------------------------------------------------------------------
    def strip_for_llm(self, model: PreTrainedModel) -> None:
        """The LLM gets inputs_embeds, so Phi4MultimodalModel never calls its embedding module."""
        model.model.embed_tokens_extend = None

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.model  # Phi4MultimodalModel: the decoder itself



def _check_clip_lengths(processor: ProcessorMixin, audios: list[Audio]) -> None:
    """A clip shorter than one analysis window (400 samples, 25 ms) has no feature frame: the feature
    extractor fails on it (a RuntimeError inside torch's unfold). Refused first, with the reason."""
    window = processor.audio_processor.win_length
    for index, audio in enumerate(audios):
        if len(audio.samples) < window:
            raise InvalidArgument(
                f"audio {index} has {len(audio.samples)} samples at {audio.sampling_rate} Hz; this model needs at "
                f"least {window} ({window * 1000 / audio.sampling_rate:g} ms)", reason="AUDIO_TOO_SHORT")


def _audio_hash_context(mode: int, index: int, count: int) -> str:
    """What joins a clip's mm_hash: the projection (rows differ by mode), and with several clips its place
    among them, so that the same clip twice is encoded twice, in the one padded batch transformers runs
    (deduplicated, it would run alone: no frame mask, other rounding)."""
    parts = ["vision"] if mode == _VISION else []
    if count > 1:
        parts.append(f"clip {index + 1} of {count}")
    return ", ".join(parts)


def _pad_crops(tensor: torch.Tensor, max_crops: int, fill: int) -> torch.Tensor:
    """[1, C, ...] padded to [1, max_crops, ...] as the HF processor does (`pad_to_max_num_crops`: pixels
    0, `pad_mask_to_max_num_crops`: masks 1), same dtype."""
    missing = max_crops - tensor.shape[1]
    if missing <= 0:
        return tensor
    pad = torch.full((1, missing, *tensor.shape[2:]), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([tensor, pad], dim=1)
