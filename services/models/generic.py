"""Generic: any transformers image-text-to-text model whose model exposes `get_image_features`.

No architecture is claimed here (`hf_architectures = ()`): registry.family_for falls back to this
family for a checkpoint no family file claims, when `can_serve` says yes. It reproduces what most
transformers VLMs do in their whole-model forward, and nothing model-specific:

  processor  the HF processor expands each image's marker into a run of the config's image token
             (`image_token_id` / `image_token_index`), often between wrapper tokens (Idefics3:
             `<fake_token_around_image><global-img>` ... `<fake_token_around_image>`; Aya Vision:
             `<|START_OF_IMG|>TILE_GLOBAL` ... `<|END_OF_IMG|>`). Only image-token positions take
             tower rows (transformers' `input_ids == image_token_id` mask). When the processor also
             returns `mm_token_type_ids`, they must mark every such position as image (1); the
             wrappers they may also mark take no rows. One image is one item, which may own SEVERAL
             runs (Idefics3/SmolVLM tiles, each its own run; Aya Vision tiles; Pixtral's rows of
             `[IMG]` between `[IMG_BREAK]`s): the processor says which text each image's marker was
             replaced with (`return_text_replacement_offsets`, mapped to tokens by the tokenizer's
             `return_offsets_mapping`), and every run must lie inside exactly one image's expansion,
             every image owning at least one (else PLACEHOLDER_COUNT_MISMATCH). The item's rows are its
             runs' tokens in prompt order (`ProcessedItem.runs`), as transformers' masked_scatter fills
             them. A processor that cannot report its replacements must give one run per image.
             The item's encoder inputs are the processor outputs `get_image_features` takes, cut per
             image (`inputs.Split`): a leading dim of one per image ([images, ...]), a batch-of-one
             layout ([1, images, ...]), flattened patches counted by a per-image integer grid
             ([sum of patches, ...] beside an [images, k] `*grid*` input) or tiles ([tiles, ...] or
             [1, tiles, ...]: Aya Vision, Idefics3 with splitting) where every tile gives the same number
             of rows, so an image's tiles are its rows / rows per tile (which must divide exactly).
             Nothing else rides along: the encoder knows the layout from the same probe (below).
  encoder    The layout (which dim holds an output's images, patches or tiles, its rank and dtype)
             comes from running the processor on the probe chat once; it is the encoder's schema.
             `model.get_image_features(**inputs)` runs on the items of a call concatenated along that
             dim (items whose tensors differ elsewhere run separately). Its `pooler_output` (one
             tensor per image or tile, a [units, tokens, hidden] tensor, or flat rows; Idefics3 gives
             one per prompt) is split per item: by that structure when it has one entry per unit, else
             in proportion to the item's units (images, tiles or patches), which must divide exactly;
             then cast to the model dtype as transformers casts before merging. The LLM checks the
             rows against the placeholder ranges.
  llm        the default prefill: each run's rows over its range (the processor service sends one
             input per run), which with the runs in prompt order is transformers' masked_scatter;
             1-D positions 0..L-1; the decoder (`model.model.get_decoder()`) called as the outer
             forward calls it; then lm_head.

Video, when the model has `get_video_features` and its config a video token id
(`video_token_id` / `video_token_index`): the same three steps with the video token, the processor's
video outputs that `get_video_features` takes (one entry per video: [videos, frames, ...]) and that
method's `pooler_output` (LLaVA-NeXT-Video: frames pooled 2x2, one run of `<video>` per video). The
processor service hands it the frames the model's own video processor samples (`sample_frames`). The
probe runs the processor on two short clips too; a checkpoint whose video path it cannot lay out is
refused. A model without both serves images only, and a video part is refused (MODALITY_UNSUPPORTED,
with `modality_refusal`'s reason).

Not covered, so `can_serve` answers a refusal with the reason (the services do not start:
FailedPrecondition MODEL_UNSUPPORTED) rather than serve wrong tokens:
  - positions the outer model computes (`get_rope_index` / `rope_deltas`: Qwen-VL, GLM-4V mRoPE);
  - masks from token types (`token_type_ids`: Gemma 3's bidirectional image blocks, PaliGemma's
    prefix-LM) or any mask the outer model builds for the decoder (`create_causal_mask`, ...);
  - image rows fed to later decoder layers (`deepstack`, `visual_pos_masks`: Qwen3-VL);
  - logits changed after lm_head (`softcap`, `logit_scale`) or embeddings scaled outside the decoder
    (`embed_scale`, `normalizer`) -- a positive scale keeps greedy tokens but changes sampling;
  - encoder-decoder models; a model without `model.model`, a decoder child of it or an lm_head;
  - processor outputs the outer forward takes that `get_image_features` does not (the generic LLM
    would drop them);
  - processors whose image runs cannot be assigned to images (a run outside every image's
    expansion, an image without one) or whose tiles do not give equal rows per tile.
The model checks read transformers' source of the outer and inner model classes for those markers,
so they follow the installed version; the processor checks run the processor on a probe chat with a
small and a large image. A behaviour none of them names is not caught: model types other than the
verified ones below are served with a warning.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import (MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING, AutoConfig, AutoTokenizer, PretrainedConfig,
                          PreTrainedModel, ProcessorMixin)
from transformers.utils import ModelOutput

from services.common.errors import FailedPrecondition, Internal, InvalidArgument, TriptychError
from services.common.video import Video, VideoLimits, video_from_frames
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt, ServeVerdict
from services.models.inputs import BOOL, FLOAT, INT, Dim, ItemSchema, Split, TensorSpec, split_items

log = logging.getLogger(__name__)

# Model types whose parity with transformers is proven by tests/e2e/test_generic_parity.py (video:
# tests/e2e/test_generic_video.py).
VERIFIED_MODEL_TYPES = frozenset({"idefics3", "aya_vision", "mistral3", "llava_next_video"})

# Source markers of the outer and inner model classes, each a behaviour the generic LLM path lacks.
_REFUSED_MARKERS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("get_rope_index", "rope_deltas"),
     "the model computes its own (multi-axis) position ids; the generic path uses 0..L-1"),
    (("token_type_ids",),
     "the forward reads token type ids (bidirectional image attention, prefix-LM masks or mRoPE positions)"),
    (("create_causal_mask", "create_masks_for_generate", "create_sliding_window_causal_mask",
      "create_bidirectional_mask"),
     "the outer model builds the decoder's attention mask itself"),
    (("deepstack", "visual_pos_masks"), "image features also enter later decoder layers (deepstack)"),
    (("softcap", "logit_scale"), "the logits are transformed after lm_head"),
    (("embed_scale", "normalizer"), "embeddings are scaled outside the decoder"),
)  # fmt: skip

# Processor outputs the generic path handles itself (not tower inputs).
_TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "mm_token_type_ids"})
# Processor outputs the replacement bookkeeping adds (not model inputs).
_BOOKKEEPING = ("text_replacement_offsets", "offset_mapping")
# mm_token_type_ids value of each modality's tokens (transformers' processors: 0 text, 1 image, 2 video).
_TOKEN_TYPE = {IMAGE: 1, VIDEO: 2}
# The model method that runs the towers on a modality's processor outputs.
_FEATURES = {IMAGE: "get_image_features", VIDEO: "get_video_features"}
# Probe images for can_serve: (width, height). The large one makes tiling processors tile.
_PROBE_SIZES = ((64, 48), (1024, 768))
# Probe clips: two of 4 frames (width, height), at 2 fps.
_PROBE_VIDEO_SIZE, _PROBE_VIDEO_FRAMES = (64, 48), 4


def _model_class(config: PretrainedConfig) -> type[PreTrainedModel] | None:
    try:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]
    except KeyError:
        return None


def _token_id(config: PretrainedConfig, modality: str) -> int | None:
    """The config's placeholder token id of `modality` (`image_token_id` or `image_token_index`, ...)."""
    for name in (f"{modality}_token_id", f"{modality}_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _params(fn: Any) -> set[str]:
    """Named parameters of a function (no self, *args, **kwargs)."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _tower_method(config: PretrainedConfig, model_class: type[PreTrainedModel], modality: str) -> Any:
    """The modality's tower method, for its parameters: the outer class's, or where that only passes
    *args / **kwargs on to the inner model (MiniCPM-V 4.6), the inner model class's."""
    method = getattr(model_class, _FEATURES[modality])
    if _params(method):
        return method
    from transformers import MODEL_MAPPING

    inner = MODEL_MAPPING.get(type(config), None)
    return getattr(inner, _FEATURES[modality], method) if inner is not None else method


def _required(fn: Any) -> set[str]:
    """Named parameters of a function that have no default."""
    return {name for name, p in inspect.signature(fn).parameters.items()
            if name != "self" and p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _video_refusal(config: PretrainedConfig, model_class: type[PreTrainedModel]) -> str | None:
    """Why the generic family takes no video of this model; None when it does."""
    if not hasattr(model_class, _FEATURES[VIDEO]):
        return f"{model_class.__name__} has no get_video_features"
    if _token_id(config, VIDEO) is None:
        return "its config has no video_token_id / video_token_index"
    return None


def _model_refusal(config: PretrainedConfig, model_class: type[PreTrainedModel]) -> str | None:
    """Why the generic path would not reproduce this model's forward; None when it would."""
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if _token_id(config, IMAGE) is None:
        return "its config has no image_token_id / image_token_index"
    try:
        with torch.device("meta"):  # the module tree only: no weights, no memory
            skeleton = model_class(config)
    except Exception as err:  # noqa: BLE001 -- any failure to build is a refusal with its reason
        return f"building {model_class.__name__} from the config failed: {type(err).__name__}: {err}"
    inner = getattr(skeleton, "model", None)
    if not isinstance(inner, PreTrainedModel):
        return f"{model_class.__name__} has no inner `model` (a PreTrainedModel) holding the towers and the decoder"
    decoder = inner.get_decoder()
    if decoder is inner or all(child is not decoder for child in inner.children()):
        return f"{type(inner).__name__} has no decoder child (language_model / text_model)"
    if not isinstance(skeleton.get_output_embeddings(), torch.nn.Linear):
        return f"{model_class.__name__} has no lm_head"
    source = inspect.getsource(model_class) + inspect.getsource(type(inner))
    for markers, reason in _REFUSED_MARKERS:
        found = [m for m in markers if m in source]
        if found:
            return f"{reason} ({', '.join(found)} in {model_class.__name__} / {type(inner).__name__})"
    return None


@dataclass(frozen=True)
class _Layout:
    """One tower input as the processor lays it out: an item's spec, and the dim items concatenate along."""

    spec: TensorSpec
    dim: int


def _probe_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in _PROBE_SIZES]


def _probe_videos() -> list[Video]:
    rng = np.random.default_rng(1)
    width, height = _PROBE_VIDEO_SIZE
    limits = VideoLimits(max_frame_pixels=width * height, max_seconds=60, max_frames=_PROBE_VIDEO_FRAMES,
                         max_total_pixels=_PROBE_VIDEO_FRAMES * width * height)
    return [video_from_frames(list(rng.integers(0, 256, (_PROBE_VIDEO_FRAMES, height, width, 3), dtype=np.uint8)),
                              2.0, limits, "probe video") for _ in range(2)]


class Generic(ModelFamily):
    name = "generic"
    hf_architectures = ()
    # What a checkpoint may take; an instance narrows it to its model's (video: see the module docstring).
    modalities = (IMAGE, VIDEO)

    def __init__(self, config: PretrainedConfig):
        super().__init__(config)
        model_class = _model_class(config)
        if model_class is None or not hasattr(model_class, "get_image_features"):
            raise FailedPrecondition(f"{config.model_type} is not an image-text-to-text model with get_image_features",
                                     reason="MODEL_UNSUPPORTED")
        self.model_class = model_class
        self.token_ids = {IMAGE: _token_id(config, IMAGE), VIDEO: _token_id(config, VIDEO)}
        self.image_token_id = self.token_ids[IMAGE]
        self.video_refusal = _video_refusal(config, model_class)
        self.modalities = (IMAGE,) if self.video_refusal else (IMAGE, VIDEO)
        # Each modality's tower inputs, e.g. pixel_values, pixel_attention_mask; pixel_values_videos
        towers = {modality: _tower_method(config, model_class, modality) for modality in self.modalities}
        self.tower_inputs = {modality: _params(method) for modality, method in towers.items()}
        self.forward_inputs = _params(model_class.forward)
        # Each modality's tower parameters without a default: what its method cannot run without.
        self.required_inputs = {modality: _required(method) for modality, method in towers.items()}

    def modality_refusal(self, modality: str) -> str | None:
        return self.video_refusal if modality == VIDEO else None

    @staticmethod
    def model_type_modalities(model_type: str) -> tuple[str, ...]:
        """What the family takes of a checkpoint of `model_type` with its default config (`triptych models`
        lists the tiny builders it serves)."""
        config = AutoConfig.for_model(model_type)
        model_class = _model_class(config)
        return (IMAGE,) if model_class is None or _video_refusal(config, model_class) else (IMAGE, VIDEO)

    # ---- which checkpoints -------------------------------------------------------------
    @classmethod
    def can_serve(cls, model_dir: Path) -> ServeVerdict:
        """Whether the generic path serves this folder exactly.

        Not served and no refusal: not an image-text-to-text model with get_image_features, not this
        family's to judge. A refusal: one that is, but whose forward or processor the generic path
        would not reproduce (module docstring); the services refuse to start with it rather than
        answer wrong tokens.
        """
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError):
            return ServeVerdict(serves=False)
        model_class = _model_class(config)
        if model_class is None or not hasattr(model_class, "get_image_features"):
            return ServeVerdict(serves=False)
        reason = _model_refusal(config, model_class) or cls(config)._processor_refusal(model_dir)
        if reason is not None:
            return ServeVerdict(serves=False, refusal=f"{model_dir}: no family file claims {model_class.__name__}, and "
                                                      f"the generic family cannot serve it exactly: {reason}")
        if config.model_type not in VERIFIED_MODEL_TYPES:
            log.warning("serving %s (%s) with the generic family; its parity with transformers is verified only "
                        "for %s", model_dir, config.model_type, ", ".join(sorted(VERIFIED_MODEL_TYPES)))
        return ServeVerdict(serves=True)

    def _processor_refusal(self, model_dir: Path) -> str | None:
        """Runs the processor on a chat with a small and a large image (and two clips, for a model with
        video), as the processor service will."""
        for modality in self.modalities:
            try:
                processor = self.load_processor(model_dir)
                token_id = self.token_ids[modality]
                if processor.tokenizer.convert_tokens_to_ids(self.placeholder_token(modality)) != token_id:
                    return f"the tokenizer does not map {modality} token id {token_id} back to itself"
                self._probe_layout(processor, modality)
            except TriptychError as err:
                return f"{modality}: {err.message}"
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                return f"the processor probe failed on {modality}: {type(err).__name__}: {err}"
        return None

    def _probe_layout(self, processor: ProcessorMixin, modality: str) -> dict[str, _Layout]:
        """What one item's tower inputs look like, read from the processor's outputs for the probe chat."""
        images, videos = (_probe_images(), []) if modality == IMAGE else ([], _probe_videos())
        count = len(images) + len(videos)
        content = [{"type": modality} for _ in range(count)] + [{"type": "text", "text": f"Describe the {modality}s."}]
        text = self.render_chat(processor, [{"role": "user", "content": content}])
        out, _, per_item = self._process(processor, text, images, videos)
        counts = [sum(n for _, n in runs) for _, runs in per_item]
        splits, sizes, grid = self._splits(out, counts, modality, self._tiles_alone(processor, images))
        split_items(out, splits, count, sizes)  # raises ValueError if the outputs do not split so
        for image in images:
            # Alone, each image must make every tower input: one the processor makes only for some images
            # (DeepSeek-OCR 2's pixel_values_local, for large ones) has no per-item layout to split.
            alone_text = self.render_chat(processor, [{"role": "user", "content": [
                {"type": modality}, {"type": "text", "text": f"Describe the {modality}."}]}])
            missing = sorted(set(splits) - set(self._process(processor, alone_text, [image])[0]))
            if missing:
                raise ValueError(f"the processor makes {missing} for some images only (not for a "
                                 f"{image.width}x{image.height} image alone)")
        layout: dict[str, _Layout] = {}
        for name, split in splits.items():
            value = out[name]
            dims: list[Dim] = [f"{name}_{i}" for i in range(value.ndim)]  # free: not tied to other tensors
            if split.dim == 1:
                dims[0] = 1  # the batch-of-one layout
            dims[split.dim] = 1 if split.how == "batched" else "units"  # items, or this item's tiles
            values: tuple[str, ...] = ()
            if name == grid:
                values = tuple(f"g{i}" for i in range(value.shape[1]))
                dims[1] = len(values)
            elif split.sizes == "patches":
                dims[0] = "*".join(f"g{i}" for i in range(out[grid].shape[1]))
            kind = FLOAT if value.is_floating_point() else BOOL if value.dtype == torch.bool else INT
            spec = TensorSpec(name, tuple(dims), kind, values)
            layout[name] = _Layout(spec, split.dim)
        return layout

    @cached_property
    def _layout(self) -> dict[str, dict[str, _Layout]]:
        """Each modality's layout of one item's tower inputs, by input name."""
        processor = self.load_processor(Path(self.config.name_or_path))
        return {modality: self._probe_layout(processor, modality) for modality in self.modalities}

    # ---- processor ---------------------------------------------------------------------
    @cached_property
    def _placeholders(self) -> dict[str, str]:
        tokenizer = AutoTokenizer.from_pretrained(self.config.name_or_path)
        return {modality: tokenizer.convert_ids_to_tokens(self.token_ids[modality]) for modality in self.modalities}

    def placeholder_token(self, modality: str) -> str:
        return self._placeholders[modality]

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any],
                   videos: list[Video] = ()) -> ProcessedPrompt:
        out, token_ids, per_item = self._process(processor, text, images, videos)
        items = []
        for modality, count in ((IMAGE, len(images)), (VIDEO, len(videos))):
            if not count:
                continue
            item_runs = [runs for kind, runs in per_item if kind == modality]
            counts = [sum(n for _, n in runs) for runs in item_runs]
            alone = self._tiles_alone(processor, images) if modality == IMAGE else None
            splits, sizes, _ = self._splits(out, counts, modality, alone)
            inputs = split_items(out, splits, count, sizes)
            items += [ProcessedItem(modality=modality, offset=runs[0][0], length=n, encoder_inputs=item_inputs,
                                    runs=tuple(runs) if len(runs) > 1 else ())
                      for runs, n, item_inputs in zip(item_runs, counts, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=sorted(items, key=lambda item: item.offset))

    def _process(self, processor: ProcessorMixin, text: str, images: list[Any], videos: list[Video] = ()
                 ) -> tuple[dict[str, Any], list[int], list[tuple[str, list[tuple[int, int]]]]]:
        """The processor's outputs, the token ids, and each item's modality and placeholder runs (images,
        then videos, each in prompt order)."""
        counts = {IMAGE: len(images), VIDEO: len(videos)}
        out, spans = self._run_processor(processor, text, images, videos)
        self._check_forward_inputs(out)
        token_ids = out["input_ids"][0].tolist()
        per_item = []
        for modality in self.modalities:
            runs = self._placeholder_runs(out, token_ids, modality)
            per_item += [(modality, item_runs) for item_runs in self._runs_per_item(
                runs, None if spans is None else spans[modality], counts[modality], modality)]
        return out, token_ids, per_item

    def _run_processor(self, processor: ProcessorMixin, text: str, images: list[Any], videos: list[Video]
                       ) -> tuple[dict[str, Any], dict[str, list[tuple[int, int]]] | None]:
        """The processor's outputs, and each item's token span [first, last] in the prompt by modality, when
        the processor reports what it replaced each media marker with (None when it cannot)."""
        media = {"images": images or None, **self.video_processor_kwargs(videos)}
        if not images and not videos:
            return processor(text=[text], return_tensors="pt"), None
        try:
            out = processor(text=[text], return_tensors="pt", return_text_replacement_offsets=True,
                            return_offsets_mapping=True, **media)
        except (NotImplementedError, TypeError):  # a tokenizer without offsets, a processor without the kwargs
            out = processor(text=[text], return_tensors="pt", **media)
        replaced, offsets = (out.pop(name, None) for name in _BOOKKEEPING)
        if not replaced or offsets is None:
            return out, None
        token_chars = offsets[0].tolist()
        spans: dict[str, list[tuple[int, int]]] = {IMAGE: [], VIDEO: []}
        for replacement in replaced[0]:
            start, end = replacement["new_span"]
            inside = [i for i, (a, b) in enumerate(token_chars) if start <= a < b <= end]
            spans.setdefault(replacement.get("type", IMAGE), []).append((inside[0], inside[-1]) if inside else (-1, -2))
        return out, spans

    def _runs_per_item(self, runs: list[tuple[int, int]], spans: list[tuple[int, int]] | None,
                       num_images: int, modality: str = IMAGE) -> list[list[tuple[int, int]]]:
        """Each item's placeholder runs, in prompt order: those inside its expansion (module docstring).
        (Messages say images; for video read videos.)"""
        token = self.placeholder_token(modality)
        if spans is None:  # the processor cannot say which runs are whose: one run per image
            if len(runs) != num_images:
                raise InvalidArgument(
                    f"{num_images} images but {len(runs)} runs of {token} in the processed prompt (run lengths "
                    f"{[n for _, n in runs]}), and the processor does not report which text replaced each image",
                    reason="PLACEHOLDER_COUNT_MISMATCH", metadata={"imageCount": str(num_images)})
            return [[run] for run in runs]
        if len(spans) != num_images:
            raise InvalidArgument(f"{num_images} images but the processor replaced {len(spans)} image markers",
                                  reason="PLACEHOLDER_COUNT_MISMATCH", metadata={"imageCount": str(num_images)})
        per_image: list[list[tuple[int, int]]] = [[] for _ in spans]
        for offset, length in _cut_at_spans(runs, spans):
            owners = [i for i, (first, last) in enumerate(spans) if first <= offset and offset + length - 1 <= last]
            if len(owners) != 1:
                raise InvalidArgument(
                    f"the run of {length} {token} at token {offset} lies inside {len(owners)} images' expansions "
                    f"(token spans {spans}); each run must belong to exactly one image",
                    reason="PLACEHOLDER_COUNT_MISMATCH", metadata={"imageCount": str(num_images)})
            per_image[owners[0]].append((offset, length))
        empty = [i for i, image_runs in enumerate(per_image) if not image_runs]
        if empty:
            raise InvalidArgument(f"images {empty} have no {token} in their expansions (token spans {spans})",
                                  reason="PLACEHOLDER_COUNT_MISMATCH", metadata={"imageCount": str(num_images)})
        return per_image

    def _check_forward_inputs(self, out: dict[str, Any]) -> None:
        towers = set().union(*self.tower_inputs.values())
        dropped = sorted((set(out) & self.forward_inputs) - towers - _TEXT_INPUTS)
        for modality in self.modalities:
            # The forward names a tower input otherwise (VideoLLaVA: forward(pixel_values_images) passes it
            # as get_image_features(pixel_values)): one float tensor the forward takes and no tower does,
            # named as the one required tower input the processor does not give plus a suffix: renamed.
            missing = sorted(self.required_inputs[modality] - set(out))
            if len(dropped) == 1 and len(missing) == 1 and dropped[0].startswith(f"{missing[0]}_") \
                    and torch.is_tensor(out[dropped[0]]) and out[dropped[0]].is_floating_point():
                out[missing[0]] = out.pop(dropped.pop())
        if dropped:
            methods = " / ".join(_FEATURES[modality] for modality in self.modalities)
            raise FailedPrecondition(
                f"the processor returns {dropped}, which {self.model_class.__name__}.forward takes and "
                f"{methods} does not; the generic family would drop them",
                reason="MODEL_UNSUPPORTED")

    def _placeholder_runs(self, out: dict[str, Any], token_ids: list[int], modality: str) -> list[tuple[int, int]]:
        """(offset, length) of each run of the modality's token; mm_token_type_ids, if any, must agree."""
        token_id = self.token_ids[modality]
        types = out.get("mm_token_type_ids")
        if types is not None:
            is_placeholder = torch.tensor(token_ids) == token_id
            if not (types[0][is_placeholder] == _TOKEN_TYPE[modality]).all():
                raise FailedPrecondition(
                    f"the processor's mm_token_type_ids do not mark every {self.placeholder_token(modality)} as "
                    f"{modality}", reason="MODEL_UNSUPPORTED")
        return self.placeholder_runs(token_ids, token_id)

    @staticmethod
    def _tiles_alone(processor: ProcessorMixin, images: list[Any]):
        """Each image's tiles along an output's dim, from the image processor run on that image alone: for
        tiles that do not all give the same rows (LFM2-VL's last tile of a row, its thumbnail)."""

        def tiles(name: str, dim: int) -> list[int]:
            image_processor = getattr(processor, "image_processor", None)
            if image_processor is None:
                return []
            alone = [image_processor(images=[image], return_tensors="pt").get(name) for image in images]
            return [0 if value is None else value.shape[dim] for value in alone]  # None: no tiles (Step3's local crops)

        return tiles

    def _splits(self, out: dict[str, Any], counts: list[int], modality: str = IMAGE, tiles_alone=None
                ) -> tuple[dict[str, Split], dict[str, list[int]], str | None]:
        """How each processor output that the modality's tower method takes holds its items (module
        docstring), the per-item sizes the splits name, and the name of the grid that counts patches (if
        any). `counts` are the items' placeholder tokens, which cut tiles; where they cannot (tiles of
        unequal rows), `tiles_alone(name, dim)` counts each image's tiles by processing it alone."""
        num_images = len(counts)
        tower_inputs = self.tower_inputs[modality]
        names = sorted(tower_inputs & set(out))
        if not names:
            raise FailedPrecondition(f"the processor returns none of {_FEATURES[modality]}' inputs {sorted(tower_inputs)}",
                                     reason="MODEL_UNSUPPORTED")
        for name in names:
            if not torch.is_tensor(out[name]):
                raise FailedPrecondition(f"processor output {name!r} is a {type(out[name]).__name__}, not a tensor",
                                         reason="MODEL_UNSUPPORTED")
        # Flattened patches: a per-image integer grid ([images, k], e.g. image_grid_thw) counts each image's rows.
        grids = [n for n in names if "grid" in n and out[n].ndim == 2 and out[n].shape[0] == num_images
                 and not out[n].is_floating_point()]
        sizes = {"patches": [math.prod(row) for row in out[grids[0]].tolist()]} if grids else {}
        splits: dict[str, Split] = {}
        for name in names:
            value = out[name]
            if value.shape[0] == num_images:  # [images, ...]
                splits[name] = Split.batched(0)
            elif value.ndim >= 2 and value.shape[0] == 1 and value.shape[1] == num_images:  # [1, images, ...]
                splits[name] = Split.batched(1)
            elif grids and value.shape[0] == sum(sizes["patches"]):  # [sum of patches, ...]
                splits[name] = Split.flat("patches")
            else:  # tiles: [tiles, ...] or [1, tiles, ...], the same rows per tile
                dim = 1 if value.ndim >= 2 and value.shape[0] == 1 else 0
                try:
                    sizes[f"{name}_tiles"] = self._tiles_per_image(name, value.shape[dim], counts)
                except InvalidArgument:
                    alone = tiles_alone(name, dim) if tiles_alone is not None else []
                    if not alone or sum(alone) != value.shape[dim]:  # the batch is not its images side by side
                        raise
                    sizes[f"{name}_tiles"] = alone
                splits[name] = Split.flat(f"{name}_tiles", dim)
        if len({split.dim for split in splits.values()}) != 1:
            raise FailedPrecondition(f"processor outputs {names} hold their images along different dims",
                                     reason="MODEL_UNSUPPORTED")
        return splits, sizes, grids[0] if grids else None

    @staticmethod
    def _tiles_per_image(name: str, tiles: int, counts: list[int]) -> list[int]:
        """Each image's tiles when every tile gives the same rows: its placeholder tokens / rows per tile."""
        total = sum(counts)
        if tiles > 0 and total % tiles == 0 and all(count % (total // tiles) == 0 for count in counts):
            return [count // (total // tiles) for count in counts]
        raise InvalidArgument(
            f"cannot cut processor output {name!r} of {tiles} images or tiles into {len(counts)} images of "
            f"{counts} placeholder tokens (not the same whole number of tokens per tile)",
            reason="PLACEHOLDER_COUNT_MISMATCH", metadata={"imageCount": str(len(counts))})

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        """The probe's layout. The budget caps patches a grid claims; without a grid every dim is a
        received tensor's, bounded by the message size."""
        specs = tuple(layout.spec for layout in self._layout[modality].values())
        grid = next((spec for spec in specs if spec.values), None)
        return ItemSchema(tensors=specs, patches="*".join(grid.values) if grid else "")

    def _units(self, layout: dict[str, _Layout], item: dict[str, torch.Tensor]) -> int:
        """The item's images, tiles or patches: the most entries any of its tensors has along its image dim."""
        return max(t.shape[layout[name].dim] for name, t in item.items())

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        # Items are concatenated along their image dim, as the processor lays out one prompt's images;
        # items whose tensors differ elsewhere (another request's padding) run in their own call.
        layout = self._layout[modality]
        groups: dict[tuple, list[int]] = {}
        for index, item in enumerate(items):
            key = tuple((name, _without(t.shape, layout[name].dim), t.dtype) for name, t in sorted(item.items()))
            groups.setdefault(key, []).append(index)
        results: list[ItemEmbeddings | None] = [None] * len(items)
        for indexes in groups.values():
            inputs = {name: torch.cat([items[i][name] for i in indexes], dim=layout[name].dim).to(model.device)
                      for name in items[indexes[0]]}
            out = getattr(model, _FEATURES[modality])(**inputs)  # get_image_features / get_video_features
            rows = self._rows(out, [self._units(layout, items[i]) for i in indexes])
            for i, item_rows in zip(indexes, rows):
                results[i] = ItemEmbeddings(embeddings=item_rows.to(model.dtype))
        return results  # type: ignore[return-value]

    def _rows(self, out: Any, units: list[int]) -> list[torch.Tensor]:
        """The tower output as [rows, hidden] per item: by its structure when it has one entry per unit
        (image, tile or patch), else in proportion to each item's units."""
        hidden = self.hidden_size
        features = out.pooler_output if isinstance(out, ModelOutput) else out
        if features is None:
            raise FailedPrecondition(f"{self.model_class.__name__}'s tower method returned no pooler_output",
                                     reason="MODEL_UNSUPPORTED")
        parts = list(features) if isinstance(features, (list, tuple)) else [features]
        if any(p.shape[-1] != hidden for p in parts):
            raise FailedPrecondition(f"image features of widths {[p.shape[-1] for p in parts]}, the decoder's is {hidden}",
                                     reason="MODEL_UNSUPPORTED")
        total = sum(units)
        if len(parts) == 1 and parts[0].ndim == 3 and parts[0].shape[0] == total:
            parts = list(parts[0])  # [units, tokens, hidden]
        if len(parts) == total:  # one entry per unit: an item's rows are its units' rows
            per_unit = [p.reshape(-1, hidden) for p in parts]
            bounds = [sum(units[:i]) for i in range(len(units) + 1)]
            return [torch.cat(per_unit[a:b]) for a, b in zip(bounds, bounds[1:])]
        rows = torch.cat([p.reshape(-1, hidden) for p in parts])  # [all rows, hidden]
        # In proportion: rows per unit (tiles), or units per row (patches merged 2x2 into one row, LFM3-VL).
        if any(n * rows.shape[0] % total for n in units):  # the model is not laid out as the probe said
            raise Internal(f"the tower gave {rows.shape[0]} rows for {total} images, tiles or patches ({units} per "
                           "item): not in proportion to each item's", reason="ENCODER_OUTPUT_MISMATCH")
        return list(rows.split([n * rows.shape[0] // total for n in units]))

    def strip_for_encoder(self, model: PreTrainedModel) -> None:
        _ = self._layout  # the encoder's schema: probe the processor at start, not on the first request
        decoder, head = model.model.get_decoder(), model.get_output_embeddings()
        _drop_children(model.model, keep=lambda child: child is not decoder)
        _drop_children(model, keep=lambda child: child is not head)

    # ---- llm ---------------------------------------------------------------------------
    def strip_for_llm(self, model: PreTrainedModel) -> None:
        decoder = model.model.get_decoder()
        _drop_children(model.model, keep=lambda child: child is decoder)

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.model.get_decoder()

    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.get_output_embeddings()


def _cut_at_spans(runs: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runs cut where one image's expansion ends and the next begins: a processor that wraps an
    image in nothing (GOT-OCR2, Aria, LightOnOCR) gives adjacent images one run of the image token.
    Cutting keeps every token's row in prompt order, as masked_scatter fills them."""
    bounds = sorted({first for first, _ in spans} | {last + 1 for _, last in spans})
    pieces = []
    for offset, length in runs:
        cuts = [b for b in bounds if offset < b < offset + length]
        starts = [offset, *cuts]
        pieces += [(a, b - a) for a, b in zip(starts, [*cuts, offset + length])]
    return pieces


def _without(shape: torch.Size, dim: int) -> tuple[int, ...]:
    return (*shape[:dim], *shape[dim + 1:])


def _drop_children(module: torch.nn.Module, keep) -> None:
    for name, child in list(module.named_children()):
        if not keep(child):
            setattr(module, name, None)
