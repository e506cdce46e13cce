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
             count; the padding crops never reach the output, so they are not sent), its
             `image_sizes` and crop masks; encoded by the HF image embedding module itself.
  llm        the default prefill: rows written over each item's range (HF's index_put, in order).

Modalities: images now. Audio (`<|audio|>`, audio_embed) is to come; note for it that HF projects
audio with `*_for_vision_speech` layers when the same prompt has images, so an audio item's
embeddings then depend on the prompt, not only on the audio.

Real checkpoints ship `vision-lora/` and `speech-lora/` adapters that transformers only applies when
the caller loads them (`model.load_adapter`); like transformers without them, the base weights are
served here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.models.base import AUDIO, IMAGE, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt

# The per-item encoder inputs, as the HF processor names them.
_PIXELS, _SIZES, _MASK = "image_pixel_values", "image_sizes", "image_attention_mask"


class Phi4Multimodal(ModelFamily):
    name = "phi4mm"
    hf_architectures = ("Phi4MultimodalForCausalLM",)
    modalities = (IMAGE,)

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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        _make_vision_attention_bidirectional(model)
        return model.to(device).eval()

    # ---- processor ---------------------------------------------------------------------
    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<|image|>", AUDIO: "<|audio|>"}[modality]

    def render_chat(self, processor: ProcessorMixin, messages: list[dict[str, Any]]) -> str:
        # AutoProcessor does not keep chat_template.jinja for this family (Phi4MultimodalProcessor's
        # __init__ does not take it); the tokenizer does. A processor that has one wins, as in HF.
        templater = processor if getattr(processor, "chat_template", None) else processor.tokenizer
        return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def num_image_tokens(self, crop_masks: torch.Tensor, image_size: torch.Tensor) -> int:
        """Embedding rows of one image: what the HF image embedding writes, and the processor counts.

        `crop_masks` [1 + crops, P, P] is the global view's patch mask (all valid), then each crop's
        (P patches a side); `image_size` [2] the HD canvas (height, width) in pixels, a whole number of
        crops a side. Laid out as one grid, the crops' valid patches must be one rectangle from the
        top-left corner (the processor pads only right and bottom, in whole patches); its size after
        the 2x2 pool gives the rows. Raises InvalidArgument otherwise.
        """
        t, s, p = self.tokens_per_crop_side, self.crop_size, self.patches_per_crop_side
        height, width = (int(x) for x in image_size)
        if height <= 0 or width <= 0 or height % s or width % s:
            raise InvalidArgument(f"image_sizes {[height, width]} is not a positive multiple of the {s} px crop",
                                  reason="ENCODER_INPUT_INVALID")
        rows, cols = height // s, width // s  # crops down and across
        if tuple(crop_masks.shape) != (1 + rows * cols, p, p):
            raise InvalidArgument(f"image_attention_mask of shape {list(crop_masks.shape)}; image_sizes "
                                  f"{[height, width]} needs [{1 + rows * cols}, {p}, {p}]",
                                  reason="ENCODER_INPUT_INVALID")
        grid = crop_masks[1:].reshape(rows, cols, p, p).transpose(1, 2).reshape(rows * p, cols * p)
        valid_h, valid_w = int(grid[:, 0].sum()), int(grid[0, :].sum())  # in patches
        rectangle = torch.zeros_like(grid)
        rectangle[:valid_h, :valid_w] = 1
        if not (crop_masks[0] == 1).all() or not torch.equal(grid, rectangle) or valid_h == 0 or valid_w == 0:
            raise InvalidArgument("image_attention_mask: the global view must be all valid and the crops' valid "
                                  "patches one rectangle from the top-left corner", reason="ENCODER_INPUT_INVALID")
        useful_h, useful_w = (valid_h + 1) // 2, (valid_w + 1) // 2  # the model keeps every second patch
        global_rows = t * t + t  # the global view, a separator after each of its t rows
        return useful_h * useful_w + useful_h + 1 + global_rows  # crops, their row separators, 1 separator

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        items: list[ProcessedItem] = []
        if not images:
            self.check_counts("images", [], [n for _, n in runs])
            return ProcessedPrompt(token_ids=token_ids, items=items)
        pixels, sizes, masks = out[_PIXELS], out[_SIZES], out[_MASK]  # [N, C, 3, S, S], [N, 2], [N, C, P, P]
        inputs, lengths = [], []
        for i in range(len(images)):
            height, width = (int(x) for x in sizes[i])
            num_crops = 1 + (height // self.crop_size) * (width // self.crop_size)  # the global view first
            inputs.append({
                _PIXELS: pixels[i : i + 1, :num_crops],  # [1, C_i, 3, S, S]: the batch's padding crops dropped
                _SIZES: sizes[i : i + 1],  # [1, 2]
                _MASK: masks[i : i + 1, :num_crops],  # [1, C_i, P, P]
            })
            lengths.append(self.num_image_tokens(masks[i, :num_crops], sizes[i]))
        for (offset, length), encoder_inputs in zip(self.cut_runs("images", runs, lengths), inputs):
            items.append(ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=encoder_inputs))
        return ProcessedPrompt(token_ids=token_ids, items=items)

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
        if AUDIO not in self.modalities:
            model.model.embed_tokens_extend.audio_embed = None

    def _check_item(self, index: int, item: dict[str, torch.Tensor]) -> int:
        """Validates one item's encoder inputs; returns its number of embedding rows."""
        missing = [k for k in (_PIXELS, _SIZES, _MASK) if k not in item]
        if missing:
            raise InvalidArgument(f"image item {index} lacks {missing}", reason="ENCODER_INPUT_INVALID")
        pixels, sizes, masks = item[_PIXELS], item[_SIZES], item[_MASK]
        s = self.crop_size
        if pixels.ndim != 5 or pixels.shape[0] != 1 or tuple(pixels.shape[2:]) != (3, s, s) or not pixels.is_floating_point():
            raise InvalidArgument(f"image item {index}: {_PIXELS} of shape {list(pixels.shape)}, expected float "
                                  f"[1, crops, 3, {s}, {s}]", reason="ENCODER_INPUT_INVALID")
        if tuple(sizes.shape) != (1, 2) or sizes.is_floating_point():
            raise InvalidArgument(f"image item {index}: {_SIZES} of shape {list(sizes.shape)}, expected integer [1, 2]",
                                  reason="ENCODER_INPUT_INVALID")
        if masks.ndim != 4 or masks.shape[:2] != pixels.shape[:2]:
            raise InvalidArgument(f"image item {index}: {_MASK} of shape {list(masks.shape)} does not match "
                                  f"{_PIXELS} {list(pixels.shape)}", reason="ENCODER_INPUT_INVALID")
        return self.num_image_tokens(masks[0], sizes[0])

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        if modality != IMAGE:
            raise InvalidArgument(f"the {self.name} encoder takes images, not {modality}", reason="MODALITY_UNSUPPORTED")
        image_embed = model.model.embed_tokens_extend.image_embed
        lengths = [self._check_item(i, item) for i, item in enumerate(items)]
        # Items with the same crop count run as one batch of the HF module (no padding crops needed).
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item[_PIXELS].shape[1], []).append(i)
        results: list[ItemEmbeddings | None] = [None] * len(items)
        for indexes in groups.values():
            rows = self._embed_images(model, image_embed, [items[i] for i in indexes], [lengths[i] for i in indexes])
            for i, embeddings in zip(indexes, rows):
                results[i] = ItemEmbeddings(embeddings=embeddings)
        return results  # type: ignore[return-value]

    def _embed_images(self, model: PreTrainedModel, image_embed: torch.nn.Module, items: list[dict[str, torch.Tensor]],
                      lengths: list[int]) -> list[torch.Tensor]:
        """Runs HF's image embedding on images of one crop count; one [rows, hidden] tensor per image.

        The module writes its rows over the image-token positions of `input_ids`: given a prompt
        that is nothing but those positions, its output is exactly the rows, in image order.
        """
        device, dtype = model.device, model.dtype
        total = sum(lengths)
        input_ids = torch.full((1, total), self.config.vision_config.image_token_id, dtype=torch.long, device=device)
        canvas = torch.zeros(1, total, self.hidden_size, dtype=dtype, device=device)
        rows = image_embed(
            input_ids,
            canvas,
            image_pixel_values=torch.cat([it[_PIXELS] for it in items]).to(device),  # [B, C, 3, S, S]
            image_sizes=torch.cat([it[_SIZES] for it in items]).to(device),  # [B, 2]
            image_attention_mask=torch.cat([it[_MASK] for it in items]).to(device),  # [B, C, P, P]
        )  # [1, total, hidden]
        return list(rows[0].split(lengths))

    # ---- llm ---------------------------------------------------------------------------
    def strip_for_llm(self, model: PreTrainedModel) -> None:
        """The LLM gets inputs_embeds, so Phi4MultimodalModel never calls its embedding module."""
        model.model.embed_tokens_extend = None

    def language_model(self, model: PreTrainedModel) -> torch.nn.Module:
        return model.model  # Phi4MultimodalModel: the decoder itself


def _make_vision_attention_bidirectional(model: PreTrainedModel) -> None:
    """Works around transformers 5.23 running the vision tower causally when no patch is masked.

    `Phi4MultimodalVisionAttention.is_causal` is True (SigLIP's is False). The tower passes no mask
    when every patch of every crop in its batch is valid, and then the SDPA and flash paths apply a
    causal mask; with any masked patch in the batch (an image whose HD canvas has padding) they use
    the bidirectional mask. So transformers' features for an image depend on the other images of the
    prompt. Served here: always bidirectional, as the checkpoint was trained (SigLIP) and as
    transformers' eager path computes; bit-identical to transformers whenever its batch has a mask.
    """
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalVisionAttention

    for module in model.modules():
        if isinstance(module, Phi4MultimodalVisionAttention):
            module.is_causal = False
