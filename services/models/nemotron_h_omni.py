"""Nemotron-H Omni (NemotronH_Omni_Reasoning_V3): a RADIO tower with pixel shuffle, and a hybrid
Mamba-2 / attention / MoE language model whose cache holds conv and SSM state beside the KV cache.

Images are tiled at dynamic resolution by the image processor: each image becomes a grid of
16 x 16 patches (`image_grid_hw` [h, w], both multiples of 2), flattened to `pixel_values`
rows of 3*16*16 values, all images of a prompt concatenated. The tower pixel-shuffles each
image's grid 2x2, so `<image>` expands to `<img>` + `<image>` x (h*w/4) + `</img>`.

The language model has no rotary positions (position comes from the Mamba layers), so plain
1-D positions and the default merge are what transformers does too.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache, DynamicCache, PreTrainedModel, ProcessorMixin

from services.models.base import IMAGE, ItemEmbeddings, ModelFamily, ProcessedItem, ProcessedPrompt
from services.models.inputs import INT, Bindings, ItemSchema, Split, TensorSpec, split_items


class NemotronHOmni(ModelFamily):
    name = "nemotron_h_omni"
    hf_architectures = ("NemotronH_Omni_Reasoning_V3",)
    modalities = (IMAGE,)
    # One packed tower pass, each image attending only to itself (as Qwen-VL).
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

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<image>"}[modality]

    # ---- typed inputs ------------------------------------------------------------------
    def _tokens(self, item: dict[str, torch.Tensor], bindings: Bindings) -> Bindings:
        """The pixel shuffle merges merge x merge patches: both sides must be multiples of it."""
        h, w, merge = bindings["h"], bindings["w"], self.merge_size
        if h % merge or w % merge:
            raise ValueError(f"image_grid_hw {[h, w]} is not a multiple of the {merge}x{merge} pixel shuffle")
        return {"tokens": h * w // merge**2}

    def encoder_schema(self, modality: str) -> ItemSchema:
        return ItemSchema(tensors=(
            TensorSpec("pixel_values", ("h*w", self.patch_dim)),  # [patches, patch values]
            TensorSpec("image_grid_hw", (1, 2), INT, values=("h", "w")),  # patches along height, width
        ), patches="h*w", derive=self._tokens)

    # ---- processor ---------------------------------------------------------------------
    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        out = processor(text=[text], images=images or None, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        grids = out["image_grid_hw"].tolist() if images else []  # [num_images] x (h, w) in patches
        self.check_counts("images", [h * w // self.merge_size**2 for h, w in grids], [n for _, n in runs])
        inputs = split_items(out, {"pixel_values": Split.flat("patches"), "image_grid_hw": Split.batched()},
                             len(images), sizes={"patches": [h * w for h, w in grids]}) if images else []
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=length, encoder_inputs=item_inputs)
                 for (offset, length), item_inputs in zip(runs, inputs)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        device = model.device
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
