"""The model-family interface: what each service needs to know about a family.

processor: render the chat, run the HF processor, cut its output into media items
           (placeholder range, what the encoder needs, what positions need).
encoder:   run the tower on a list of items, one embedding set per item.
llm:       merge embeddings at their placeholder ranges, positions (mRoPE), and the
           per-layer inputs of the language model.

Shared code asks a family; it never tests which family it has (STYLE.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import jinja2
import torch
from transformers import (AutoModelForImageTextToText, AutoProcessor, Cache, DynamicCache, PretrainedConfig,
                          PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin)

from services.common.audio import Audio
from services.common.errors import InvalidArgument
from services.common.video import Video
from services.models.inputs import Bindings, ItemSchema, validate

IMAGE, VIDEO, AUDIO = "image", "video", "audio"


@dataclass(frozen=True)
class VideoPruning:
    """EVS on one video item (services/models/evs.py): the rate, and the item before pruning; the kept
    token count is the item's `length`."""

    rate: float  # in (0, 1)
    frames: int  # frame groups of its embedding rows
    unpruned_length: int  # frames x merged tokens per frame


@dataclass(frozen=True)
class ProcessedItem:
    """One media item after the HF processor, ready for the encoder and the LLM."""

    modality: str
    offset: int  # first placeholder token in the prompt
    length: int  # number of placeholder tokens == embedding rows
    encoder_inputs: dict[str, torch.Tensor]  # this item's slice of the processor output
    position_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. image_grid_thw [1, 3]
    # (offset, length) of each placeholder run when the item's tokens are split into several runs
    # (tiles between row/column tokens); they take consecutive embedding rows and sum to `length`.
    # Empty: one run, (offset, length).
    runs: tuple[tuple[int, int], ...] = ()
    # Position inputs of each run, where every run has its own (Qwen3-VL video: a run per timestamped
    # frame group, each with its grid [[1, h, w]]). Empty: `position_inputs` go with the first run.
    run_position_inputs: tuple[dict[str, torch.Tensor], ...] = ()
    # What besides the item's media decides its embeddings (Phi-4-MM projects audio with other layers
    # when the prompt has images); the processor appends it to the item's mm_hash, so that caches keyed
    # by mm_hash keep the variants apart. Empty: the media alone decide.
    hash_context: str = ""
    pruning: VideoPruning | None = None  # a video whose placeholders were cut to EVS's retained count

    @property
    def placeholder_runs(self) -> tuple[tuple[int, int], ...]:
        return self.runs or ((self.offset, self.length),)

    def position_inputs_of_run(self, index: int) -> dict[str, torch.Tensor]:
        """What the LLM gets for the placeholder run `index` to compute its positions."""
        if self.run_position_inputs:
            return self.run_position_inputs[index]
        return self.position_inputs if index == 0 else {}


@dataclass(frozen=True)
class ProcessedPrompt:
    """A rendered chat after the HF processor: expanded token ids and media items in prompt order."""

    token_ids: list[int]
    items: list[ProcessedItem]


@dataclass(frozen=True)
class ItemEmbeddings:
    """What the encoder returns for one item."""

    embeddings: torch.Tensor  # [num_tokens, hidden_size]
    deepstack: tuple[torch.Tensor, ...] = ()  # Qwen3-VL: one [num_tokens, hidden_size] per layer
    # EVS: the rows' indexes (int64, ascending) into the item's unpruned token sequence; None: not pruned.
    kept: torch.Tensor | None = None
    # The rows are cross-attention states (ModelFamily.cross_attention), not one per placeholder token:
    # they travel as ItemEmbeddings.cross_attention_states on the wire.
    cross_attention: bool = False


@dataclass(frozen=True)
class ServeVerdict:
    """A family's answer for a checkpoint folder that no family claims by architecture.

    `serves`: the family serves it exactly. `refusal`: the folder is of the family's kind, but it
    would not reproduce the model's outputs; why (the services refuse to start with this reason).
    Neither: not the family's business.
    """

    serves: bool
    refusal: str | None = None


@dataclass(frozen=True)
class PlacedEmbeddings:
    """One item's embeddings with where they go, as the LLM service receives them."""

    modality: str
    offset: int
    length: int
    embeddings: ItemEmbeddings
    position_inputs: dict[str, torch.Tensor]
    # EVS: each row's index into the item's unpruned token sequence ([length] int64, ascending, checked
    # by the LLM); None: not pruned, row i is token i.
    kept: torch.Tensor | None = None


@dataclass
class PrefillInputs:
    """Everything the language model's first forward needs, plus what decode steps reuse."""

    inputs_embeds: torch.Tensor  # [1, L, hidden_size]
    position_ids: torch.Tensor | None  # None: positions 0..L-1; mRoPE: [3, 1, L]
    rope_delta: int = 0  # decode position = cache length + rope_delta
    # Extra language-model kwargs at prefill; they override the engine's own (e.g. a family's
    # attention_mask with bidirectional image blocks).
    layer_kwargs: dict[str, Any] = field(default_factory=dict)
    # Extra language-model kwargs of every decode step, kept by for_decode (Mllama: the cross-attention
    # mask row of the next token); the family's decode_kwargs hands them over.
    decode_layer_kwargs: dict[str, Any] = field(default_factory=dict)

    def for_decode(self) -> PrefillInputs:
        """What decode steps keep of it: the positions' axes and delta, the device. The prompt-sized
        tensors go (a long prompt's embeddings are megabytes per running request on a real model)."""
        return PrefillInputs(inputs_embeds=self.inputs_embeds.new_empty(1, 0, self.inputs_embeds.shape[-1]),
                             position_ids=None if self.position_ids is None else self.position_ids[..., :0].clone(),
                             rope_delta=self.rope_delta, decode_layer_kwargs=self.decode_layer_kwargs)


class ModelFamily(ABC):
    """A model family: subclasses set the class attributes and implement the abstract methods."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]
    modalities: ClassVar[tuple[str, ...]]

    def __init__(self, config: PretrainedConfig):
        self.config = config

    @classmethod
    def can_serve(cls, model_dir: Path) -> ServeVerdict:
        """For a family without fixed architectures (generic): whether it serves this folder, or why not."""
        return ServeVerdict(serves=False)

    def checkpoint_refusal(self) -> str | None:
        """Why this family will not serve a checkpoint of one of its architectures (the services refuse to
        start, MODEL_UNSUPPORTED), e.g. a variant whose processor or outputs are not a chat generation."""
        return None

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, path: Path, dtype: torch.dtype, device: str) -> PreTrainedModel:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
        return model.to(device).eval()

    def load_processor(self, path: Path) -> ProcessorMixin:
        return AutoProcessor.from_pretrained(path)

    @property
    def text_config(self) -> PretrainedConfig:
        return self.config.get_text_config()

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def max_context_tokens(self) -> int:
        return self.text_config.max_position_embeddings

    # Media enter through cross-attention layers (Mllama): an item is one placeholder token, and its
    # encoder output is the states those layers attend to (the contract's cross_attention_states, whose
    # shape the family checks in check_cross_attention_states), not rows written over placeholders.
    cross_attention: ClassVar[bool] = False

    def check_cross_attention_states(self, shape: tuple[int, ...], where: str) -> None:
        """INVALID_ARGUMENT (CROSS_ATTENTION_STATES_INVALID) unless `shape` is one item's cross-attention
        states; only a family with `cross_attention` takes them."""
        raise InvalidArgument(f"{where}: the {self.name} model takes embeddings, not cross_attention_states",
                              reason="CROSS_ATTENTION_STATES_INVALID", metadata={"family": self.name})

    @property
    def num_deepstack_layers(self) -> int:
        """Extra [num_tokens, hidden] tensors an item's embeddings carry for the LLM's first layers
        (Qwen3-VL deepstack: one per layer); 0 for a family whose LLM takes the merged rows only."""
        return 0

    # ---- processor ---------------------------------------------------------------------
    @abstractmethod
    def placeholder_token(self, modality: str) -> str:
        """The token that the processor repeats once per embedding row of an item."""

    def render_chat(self, processor: ProcessorMixin, messages: list[dict[str, Any]]) -> str:
        """The prompt text for HF-style chat messages, with the model's own chat template.

        Some processors (Phi-4-MM) do not keep the checkpoint's template; the tokenizer does.
        """
        templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
        try:
            return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except jinja2.TemplateError as err:  # templates raise_exception(), e.g. on roles that do not alternate
            raise InvalidArgument(f"the model's chat template rejected the messages: {err}",
                                  reason="CHAT_TEMPLATE_REJECTED") from err

    @abstractmethod
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        """Runs the HF processor and cuts its output into per-item inputs, in prompt order.

        A family that takes video or audio adds keyword parameters `videos: list[Video]` and/or
        `audios: list[Audio]` (services/common/{video,audio}.py); the processor service passes them
        only when the request has such media, and only to a family whose `modalities` name them.
        Items of all modalities come back in prompt order (their offsets ascending).
        """

    def modality_refusal(self, modality: str) -> str | None:
        """Why this checkpoint does not take `modality`, for the error a request with it gets (the generic
        family: a model without a video path); None: nothing more to say than `modalities`."""
        return None

    # ---- video and audio: what the processor decodes for the HF processor ----------------------
    def video_frame_indices(self, processor: ProcessorMixin, metadata: Any, fps: float, max_frames: int) -> list[int]:
        """The frames of a clip the model sees, from its metadata alone (nothing is decoded yet): the
        family's own video processor's `sample_frames` at `fps` (as `do_sample_frames=True, fps=...`
        samples in transformers), or `max_frames` of them evenly spread where `fps` would give more.
        The processor then decodes only these frames and passes them with `do_sample_frames=False`."""
        video_processor = processor.video_processor
        try:
            indices = [int(i) for i in video_processor.sample_frames(metadata, fps=fps)]
        except ValueError:  # transformers' default and InternVL's samplers refuse a clip with fewer frames
            # than `fps` asks for (a 1-fps slideshow at 2 fps): every frame, as Qwen2-VL's sampler clamps
            indices = [int(i) for i in video_processor.sample_frames(
                metadata, num_frames=min(metadata.total_num_frames, max_frames))]
        if len(indices) > max_frames:
            indices = [int(i) for i in video_processor.sample_frames(metadata, num_frames=max_frames)]
        return indices

    @staticmethod
    def video_processor_kwargs(videos: list[Video]) -> dict[str, Any]:
        """The HF processor's video arguments for frames chosen by `video_frame_indices`."""
        if not videos:
            return {}
        return {"videos": [video.frames for video in videos], "video_metadata": [video.metadata for video in videos],
                "do_sample_frames": False}

    def audio_sampling_rate(self, processor: ProcessorMixin) -> int:
        """The rate (Hz) the model's feature extractor takes; the processor resamples every clip to it."""
        return int(processor.feature_extractor.sampling_rate)

    # ---- EVS (efficient video sampling, services/models/evs.py) -------------------------------
    # A family that sets this implements video_token_grid, and its LLM side places pruned video items
    # (PlacedEmbeddings.kept) where they were unpruned: its prefill_inputs gives each kept row the
    # position it had in the unpruned prompt (a family with 1-D positions needs nothing more).
    supports_video_pruning: ClassVar[bool] = False

    @property
    def default_video_pruning_rate(self) -> float:
        """The EVS rate the whole model applies by itself (a checkpoint's config); the processor's default
        when its --video-pruning-rate is 0. 0: transformers prunes nothing."""
        return 0.0

    def video_token_grid(self, encoder_inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
        """(frame groups, merged tokens per group) of a video item's embedding rows, which the tower
        returns group by group: EVS compares each group with the one before. The item was checked
        against encoder_schema."""
        raise NotImplementedError(f"{type(self).__name__} has no EVS")

    def pruned_placeholder_runs(self, item: ProcessedItem, retained: int) -> tuple[int, ...]:
        """The length of each of a video item's placeholder runs once EVS keeps `retained` of its tokens
        (0: the run goes; the text between runs stays), before the encoder has chosen which: the prompt's
        length, and so prompt_tokens, is fixed then. Default: one run keeps one run of `retained`; an item
        of one run per frame group (its text between runs: timestamps, frame labels) puts them all in its
        first run, as vLLM does, and once the encoder has answered the processor gives each group's run
        the tokens kept of that group (evs.frame_runs), the prompt's length unchanged."""
        return (retained,) + (0,) * (len(item.placeholder_runs) - 1)

    def image_encoder_inputs(self, processor: ProcessorMixin, image: Any) -> dict[str, torch.Tensor]:
        """One image's encoder inputs, exactly as `preprocess` cuts them out of any prompt holding it:
        what an encoder makes of an image it receives as compressed bytes (services/encoder/media_inputs.py).

        Default: `preprocess` on a chat of that one image. Exact where the processor treats each image
        on its own, whatever else the prompt holds: padding to a batch's largest image is cut off by
        the family's split (LLaVA-NeXT, Phi-4-MM) or by the tower itself (Pixtral crops each image to
        its image_sizes, so its inputs differ in padding only). tests/encoder/test_media_inputs.py
        proves the embeddings equal per family, bitwise.
        """
        text = self.render_chat(processor, [{"role": "user", "content": [{"type": IMAGE}]}])
        (item,) = self.preprocess(processor, text, [image]).items
        return item.encoder_inputs

    # ---- typed inputs (services/models/inputs.py) ----------------------------------------
    @abstractmethod
    def encoder_schema(self, modality: str) -> ItemSchema:
        """The tensors one item of this modality carries to the encoder, and how their dims tie."""

    def position_schema(self, modality: str) -> ItemSchema:
        """The tensors the LLM needs for an item's positions (binding `tokens` to its placeholder
        length when they imply one); none by default."""
        return ItemSchema(tensors=())

    def check_encoder_item(self, modality: str, item: dict[str, torch.Tensor], *, where: str,
                           max_patches: int | None = None) -> Bindings:
        """INVALID_ARGUMENT (ENCODER_INPUT_INVALID, or ITEM_TOO_LARGE over `max_patches`) naming the
        tensor and the dim, unless the item fits the schema. Reads shapes and small value tensors only."""
        return validate(self.encoder_schema(modality), item, where=where, reason="ENCODER_INPUT_INVALID",
                        max_patches=max_patches)

    def check_position_inputs(self, modality: str, tensors: dict[str, torch.Tensor], length: int, *,
                              where: str, kept: torch.Tensor | None = None) -> None:
        """The LLM's check of an item's position inputs: the schema, and the tokens they imply against
        its placeholder length (so a claimed grid never sizes an allocation). A pruned item (`kept`,
        already checked ascending, one per placeholder) has fewer: its indexes must lie below them."""
        schema = self.position_schema(modality)
        tokens = validate(schema, tensors, where=where, reason="POSITION_INPUT_INVALID").get("tokens")
        if kept is not None:  # (a family without position inputs has no count to hold them to, nor a use)
            if tokens is not None and length and int(kept[-1]) >= tokens:
                raise InvalidArgument(f"{where}: kept token index {int(kept[-1])} is past the item's {tokens} unpruned "
                                      "tokens", reason="VIDEO_KEPT_TOKENS_INVALID")
            return
        if tokens is not None and tokens != length:
            names = ", ".join(spec.name for spec in schema.tensors)
            raise InvalidArgument(f"{where}: {names} mean {tokens} tokens, the placeholder range has {length}",
                                  reason="POSITION_INPUT_INVALID")

    # ---- encoder -----------------------------------------------------------------------
    @abstractmethod
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        """Runs the tower for a batch of items of one modality, each checked by check_encoder_item;
        one result per item."""

    # How the tower treats a batch (services/encoder/batcher.py; tests/encoder/test_batch_claims.py
    # checks each family's claim): "exact": an item's embeddings are bitwise the same in any batch;
    # "tolerance": within `encoder_batch_tolerance` (absolute) of alone (packed sequences: GEMMs over
    # more rows may block differently); "alone": they depend on the other items of the call, so a
    # call's items of one modality run together exactly as sent, never with another call's, and the
    # embedding cache keys them by the whole group. The default is the safe one for unknown towers.
    encoder_batching: ClassVar[Literal["exact", "tolerance", "alone"]] = "alone"
    encoder_batch_tolerance: ClassVar[float] = 0.0

    def strip_for_encoder(self, model: PreTrainedModel) -> None:
        """Drops the language model so an encoder holds only the towers."""
        model.model.language_model = None
        model.lm_head = None

    # ---- llm ---------------------------------------------------------------------------
    # Where transformers' ImageTextToText models keep their towers (Qwen-VL: visual; LLaVA-style: the rest).
    tower_attributes: ClassVar[tuple[str, ...]] = ("visual", "vision_tower", "multi_modal_projector")

    def strip_for_llm(self, model: PreTrainedModel) -> None:
        """Drops the towers so the LLM service holds only the language model."""
        found = [name for name in self.tower_attributes if getattr(model.model, name, None) is not None]
        if not found:  # a layout this default does not know: the family must say what its towers are
            raise NotImplementedError(f"{type(self).__name__}: no tower among {self.tower_attributes}; "
                                      "override strip_for_llm")
        for name in found:
            setattr(model.model, name, None)

    def new_cache(self, model: PreTrainedModel) -> Cache:
        """A fresh cache for one request: attention KV here; hybrid families also keep SSM state."""
        return DynamicCache(config=self.text_config)

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.model.language_model

    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.lm_head

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        """Token embeddings with each item's embeddings written over its placeholder range."""
        embeds = model.get_input_embeddings()(token_ids[None])  # [1, L, H]
        for item in placed:
            rows = item.embeddings.embeddings.to(embeds.device, embeds.dtype)
            embeds[0, item.offset : item.offset + item.length] = rows
        return PrefillInputs(inputs_embeds=embeds, position_ids=None)

    def decode_kwargs(self, prefill: PrefillInputs, cache_length: int) -> dict[str, Any]:
        """Extra language-model kwargs for the decode step at `cache_length` (override the engine's)."""
        return {}

    def decode_token_kwargs(self, model: PreTrainedModel, token_ids: torch.Tensor) -> dict[str, Any]:
        """Extra language-model kwargs of a decode step computed from the tokens it feeds ([B, 1]): what
        the model derives from token ids besides their embeddings (Gemma 4's per-layer embeddings), since
        the engine feeds embeddings. Default: none."""
        return {}

    def decode_position_ids(self, prefill: PrefillInputs, cache_length: int) -> torch.Tensor | None:
        """Position ids of the next decoded token; None means the model's default (cache length)."""
        if prefill.position_ids is None:
            return None
        position = torch.tensor([[cache_length + prefill.rope_delta]], device=prefill.inputs_embeds.device)
        return position.expand(prefill.position_ids.shape[0], 1, 1)

    # ---- batched decode (services/llm/engine) -------------------------------------------
    # The engine prefills each request alone (the hooks above), merges its cache into one batch
    # cache by layer type, and decodes all rows of a batch in one forward with a [B, P+1] padding
    # mask. A family whose rows cannot share that forward exactly says so here.
    supports_batching: ClassVar[bool] = True

    def batch_key(self, prompt_length: int, max_new_tokens: int) -> Hashable | None:
        """Which rows may share a decode forward: rows with equal keys; None: this row decodes alone.

        Default: one key for all, except where the rotary frequencies of a forward depend on the
        largest position in it (longrope switches to its long factors, dynamic NTK rescales, past
        `original_max_position_embeddings`): a row that may pass that length decodes alone, as it
        would in generate(); rows that stay below it share one batch.
        """
        if not self.supports_batching:
            return None
        limit = self._position_dependent_rope_limit()
        if limit is not None and prompt_length + max_new_tokens > limit:
            return None
        return "batch"

    def decode_group(self, prefill: PrefillInputs) -> Hashable | None:
        """Rows of one `batch_key` share a decode forward only with rows of the same group (their
        PrefillInputs as decode keeps them). None for all: no split. Mllama: rows with images apart from
        text-only rows, whose forward skips the cross-attention layers."""
        return None

    @property
    def fixed_cache_layers(self) -> frozenset[int]:
        """Cache layers that hold no text timeline, written once at prefill (Mllama: the cross-attention
        layers' K/V of the request's images): the batch cache right-pads them to its longest row and
        never trims them with the text; the family's batch_decode_kwargs masks the padding."""
        return frozenset()

    def _position_dependent_rope_limit(self) -> int | None:
        params = getattr(self.text_config, "rope_parameters", None) or {}
        # one dict, or one per layer type (Gemma 3)
        entries = [params] if "rope_type" in params else [v for v in params.values() if isinstance(v, dict)]
        limits = [int(e.get("original_max_position_embeddings") or self.max_context_tokens)
                  for e in entries if e.get("rope_type") in ("longrope", "dynamic")]
        return min(limits) if limits else None

    def batch_decode_position_ids(self, prefills: list[PrefillInputs], lengths: list[int]) -> torch.Tensor:
        """Position ids of one decode step for rows whose caches hold `lengths` real tokens (padding not
        counted): [B, 1], or [k, B, 1] when a row has k-axis positions (mRoPE).

        Each row's position is `decode_position_ids` alone; a row with 1-D positions in an mRoPE batch
        (a text-only prompt) gets its position on every axis, as the model expands 2-D positions itself.
        """
        device = prefills[0].inputs_embeds.device
        rows = [torch.tensor([[length]], device=device) if row is None else row  # [1, 1] or [k, 1, 1]
                for row, length in ((self.decode_position_ids(prefill, length), length)
                                    for prefill, length in zip(prefills, lengths, strict=True))]
        axes = max((row.shape[0] for row in rows if row.ndim == 3), default=0)
        if not axes:
            return torch.cat(rows)  # [B, 1]
        return torch.cat([row if row.ndim == 3 else row.expand(axes, 1, 1) for row in rows], dim=1)  # [k, B, 1]

    def batch_decode_kwargs(self, prefills: list[PrefillInputs], lengths: list[int]) -> dict[str, Any]:
        """Extra language-model kwargs of one decode step over rows (override the engine's). Default: a
        single row's `decode_kwargs`; a family whose rows need any must override this to batch them."""
        rows = [self.decode_kwargs(prefill, length) for prefill, length in zip(prefills, lengths, strict=True)]
        if len(rows) == 1:
            return rows[0]
        if any(rows):
            raise NotImplementedError(f"{type(self).__name__} has per-row decode kwargs; override batch_decode_kwargs")
        return {}

    # ---- shared checks -----------------------------------------------------------------
    def placeholder_token_id(self, tokenizer: PreTrainedTokenizerBase, modality: str) -> int:
        token_id = tokenizer.convert_tokens_to_ids(self.placeholder_token(modality))
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {self.placeholder_token(modality)} token")
        return token_id

    @staticmethod
    def placeholder_runs(token_ids: list[int], token_id: int) -> list[tuple[int, int]]:
        """(offset, length) of each maximal run of `token_id` in the prompt."""
        runs: list[tuple[int, int]] = []
        start = None
        for i, tok in enumerate([*token_ids, None]):
            if tok == token_id and start is None:
                start = i
            elif tok != token_id and start is not None:
                runs.append((start, i - start))
                start = None
        return runs

    @staticmethod
    def check_counts(what: str, expected: list[int], got: list[int]) -> None:
        if expected != got:
            raise InvalidArgument(
                f"{what}: the processor made placeholder runs of {got} tokens, the items need {expected}",
                reason="PLACEHOLDER_COUNT_MISMATCH",
            )
