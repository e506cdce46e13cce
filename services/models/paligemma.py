"""PaliGemma and PaliGemma 2: a SigLIP tower projected to the text width, and a Gemma (PaliGemma) or
Gemma 2 (PaliGemma 2) language model run as a prefix LM.

What transformers 5.23's PaliGemmaModel.forward does, and where this file does the same:
- Each image is one square crop that the tower turns into (image_size / patch)^2 rows, projected by
  one linear layer (`get_image_features(...).pooler_output`): `encode`.
- The prompt is `<image>` x N per image, then `<bos>`, the prefix text and `\\n` (the processor
  inserts the `<bos>` after the last image token and appends the newline); the image tokens'
  embeddings are replaced by the image rows: `prefill_inputs`.
- Prefix-LM attention: the processor's token_type_ids are 0 on the whole prompt (1 only on a
  training suffix), and at prefill `block_sequence_ids = where(token_type_ids == 0, 0, -1)` makes
  the prompt one block that attends to itself both ways, images and text alike; generated tokens
  attend causally. The masks are built here with the same transformers functions (full, and sliding
  for PaliGemma 2's Gemma 2 layers) and handed to the engine as the prefill's `attention_mask`;
  decode steps use the plain masks the text model builds itself.
- Positions are 1-indexed (`arange(L) + 1`, and generate() adds 1 to its own): prefill positions
  1..L, a decode step at cache length n is at position n + 1.
- PaliGemma 2 caps the final logits (`final_logit_softcapping`, tanh) in the whole model's forward,
  not in the text model: `lm_head` applies it too, so logprobs and sampling see the same logits.

PaliGemma's processor refuses a prompt without an image (`images are expected`): so does this family,
with IMAGE_REQUIRED. Checkpoints carry no chat template; `render_chat` then writes PaliGemma's own
prompt format (`PALIGEMMA_CHAT_TEMPLATE`: the images, then the user's text).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel, ProcessorMixin
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from services.common.errors import InvalidArgument
from services.models.base import (
    IMAGE,
    ItemEmbeddings,
    ModelFamily,
    PlacedEmbeddings,
    PrefillInputs,
    ProcessedItem,
    ProcessedPrompt,
)
from services.models.inputs import ItemSchema, Split, TensorSpec, split_items

# PaliGemma's prompt format as a chat template: every image of the conversation as `<image>`, then
# the text of the user turns, space-joined (a PaliGemma prompt is a task prefix, not a chat: the
# processor adds `<bos>` after the images and the closing `\n`).
PALIGEMMA_CHAT_TEMPLATE = """
{%- set ns = namespace(text='') -%}
{%- for message in messages if message['role'] == 'user' -%}
    {%- if message['content'] is string -%}
        {%- set ns.text = ns.text + (' ' if ns.text else '') + message['content'] | trim -%}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<image>' }}
            {%- elif item['type'] == 'text' -%}
                {%- set ns.text = ns.text + (' ' if ns.text else '') + item['text'] | trim -%}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endfor -%}
{{ ns.text }}"""


class SoftcappedHead(torch.nn.Module):
    """lm_head, then PaliGemmaForConditionalGeneration's final softcap: cap * tanh(logits / cap)."""

    def __init__(self, head: torch.nn.Module, cap: float):
        super().__init__()
        self.head = head
        self.cap = cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(hidden) / self.cap) * self.cap


class PaliGemma(ModelFamily):
    name = "paligemma"
    hf_architectures = ("PaliGemmaForConditionalGeneration",)
    modalities = (IMAGE,)
    # Fixed-size SigLIP crops stacked on the batch dim; no op mixes them.
    encoder_batching = "exact"

    @property
    def tokens_per_image(self) -> int:
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def placeholder_token(self, modality: str) -> str:
        return {IMAGE: "<image>"}[modality]

    # ---- processor ---------------------------------------------------------------------
    def render_chat(self, processor: ProcessorMixin, messages: list[dict[str, Any]]) -> str:
        if getattr(processor, "chat_template", None):
            return super().render_chat(processor, messages)
        return processor.apply_chat_template(messages, chat_template=PALIGEMMA_CHAT_TEMPLATE, tokenize=False)

    def preprocess(self, processor: ProcessorMixin, text: str, images: list[Any]) -> ProcessedPrompt:
        if not images:
            raise InvalidArgument("PaliGemma takes no prompt without an image (its processor prefixes every prompt "
                                  "with the image tokens); add an image part", reason="IMAGE_REQUIRED")
        out = processor(text=[text], images=images, return_tensors="pt")
        token_ids = out["input_ids"][0].tolist()
        # Images given one after another make one run of placeholders: each image is the next N of them.
        n = self.tokens_per_image
        runs = self.placeholder_runs(token_ids, self.placeholder_token_id(processor.tokenizer, IMAGE))
        lengths = [length for _, length in runs]
        if any(length % n for length in lengths) or sum(lengths) != n * len(images):
            self.check_counts("images", [n] * len(images), lengths)  # raises: they differ
        offsets = [offset + i * n for offset, length in runs for i in range(length // n)]
        inputs = split_items(out, {"pixel_values": Split.batched()}, len(images))  # [1, 3, S, S] each
        items = [ProcessedItem(modality=IMAGE, offset=offset, length=n, encoder_inputs=item_inputs)
                 for offset, item_inputs in zip(offsets, inputs, strict=True)]
        return ProcessedPrompt(token_ids=token_ids, items=items)

    # ---- encoder -----------------------------------------------------------------------
    def encoder_schema(self, modality: str) -> ItemSchema:
        size = self.config.vision_config.image_size
        return ItemSchema(tensors=(TensorSpec("pixel_values", (1, 3, size, size)),),
                          patches=str(self.tokens_per_image),
                          derive=lambda item, bindings: {"tokens": self.tokens_per_image})

    @torch.inference_mode()
    def encode(self, model: PreTrainedModel, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        pixel_values = torch.cat([it["pixel_values"] for it in items]).to(model.device)  # [B, 3, S, S]
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output  # [B, N, hidden]
        return [ItemEmbeddings(embeddings=f) for f in features]

    # ---- llm ---------------------------------------------------------------------------
    def lm_head(self, model: PreTrainedModel) -> torch.nn.Module:
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        return model.lm_head if cap is None else SoftcappedHead(model.lm_head, cap)

    def prefill_inputs(self, model: PreTrainedModel, token_ids: torch.Tensor, placed: list[PlacedEmbeddings]) -> PrefillInputs:
        image_token_id = self.config.image_token_id
        lookup_ids = token_ids
        if image_token_id >= self.text_config.vocab_size:  # as PaliGemmaModel: an out-of-vocab placeholder embeds as 0
            lookup_ids = token_ids.masked_fill(token_ids == image_token_id, 0)
        embeds = model.get_input_embeddings()(lookup_ids[None])  # [1, L, H]
        for item in placed:
            embeds[0, item.offset : item.offset + item.length] = item.embeddings.embeddings.to(embeds.device, embeds.dtype)
        length = token_ids.shape[0]
        position_ids = torch.arange(1, length + 1, device=embeds.device)[None]  # 1-indexed
        mask_kwargs = dict(
            config=model.config.get_text_config(),  # the loaded one: it names the attention implementation
            inputs_embeds=embeds,
            attention_mask=torch.ones(1, length, dtype=torch.long, device=embeds.device),
            past_key_values=self.new_cache(model),  # empty, like the engine's: sizes the masks for prefill
            position_ids=position_ids,
            # token_type_ids are 0 on the whole prompt: one bidirectional block
            block_sequence_ids=torch.zeros(1, length, dtype=torch.long, device=embeds.device),
        )
        mask: Any = create_causal_mask(**mask_kwargs)
        if getattr(self.text_config, "sliding_window", None) is not None:  # PaliGemma 2
            mask = {"full_attention": mask, "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        return PrefillInputs(inputs_embeds=embeds, position_ids=position_ids, rope_delta=1,
                             layer_kwargs={"attention_mask": mask})

    def decode_position_ids(self, prefill: PrefillInputs, cache_length: int) -> torch.Tensor | None:
        return torch.tensor([[cache_length + prefill.rope_delta]], device=prefill.inputs_embeds.device)  # [1, 1]
