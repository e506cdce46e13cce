"""Gemma 4: the three services give transformers' greedy tokens: per-layer embeddings, KV-shared
layers, and bidirectional attention within each image on the sliding layers.

A split that ran the prefill with plain causal masks would still produce plausible tokens, so parity
proves the masks right only if they matter: on the tiny checkpoint, transformers itself must decode
other tokens when mm_token_type_ids are left out (plain causal masks), for every image case.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from services.models.base import PlacedEmbeddings
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import CASES, MAX_NEW_TOKENS, family_services, model_info_test, parity_tests
from tests.reference import _load, hf_generate

services = family_services("gemma4")
test_parity = parity_tests("gemma4")
test_model_info = model_info_test("gemma4")


@pytest.mark.parametrize("case", ["one-image", "one-image-other", "two-images"])
def test_bidirectional_image_mask_changes_tokens(case):
    """Power for test_parity: with plain causal masks transformers itself decodes other tokens."""
    model_dir = tiny_checkpoint("gemma4")
    model, processor = _load(model_dir, "AutoModelForImageTextToText")
    prompt, images = CASES[case]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(data)) for data in images], return_tensors="pt",
                       add_special_tokens=False)
    assert inputs["mm_token_type_ids"].sum() > 0
    causal_inputs = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.inference_mode():
        causal = model.generate(**causal_inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS) != causal[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("case", ["text-only", "two-images"])
def test_prefill_logits_equal_the_whole_model(case):
    """In process, bit for bit: the family's encode + prefill (per-layer embeddings, masks, the KV-shared
    layers on the last position only) give the whole model's last logits. Tokens alone would not show
    it: with the KV-shared layers run over the whole prompt the logits move by ~1e-6."""
    model_dir = tiny_checkpoint("gemma4")
    model, processor = _load(model_dir, "AutoModelForImageTextToText")
    family = family_for(model_dir)
    prompt, images = CASES[case]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    processed = family.preprocess(processor, text, pil_images)
    inputs = processor(text=[text], images=pil_images or None, return_tensors="pt", add_special_tokens=False)
    with torch.inference_mode():
        rows = family.encode(model, "image", [item.encoder_inputs for item in processed.items]) if images else []
        placed = [PlacedEmbeddings(item.modality, item.offset, item.length, emb, item.position_inputs)
                  for item, emb in zip(processed.items, rows)]
        prefill = family.prefill_inputs(model, torch.tensor(processed.token_ids), placed)
        length = len(processed.token_ids)
        kwargs = dict(inputs_embeds=prefill.inputs_embeds, attention_mask=torch.ones(1, length, dtype=torch.long),
                      past_key_values=family.new_cache(model), use_cache=True)
        out = family.language_model(model)(**(kwargs | prefill.layer_kwargs))  # as the engine calls it
        ours = family.lm_head(model)(out.last_hidden_state[:, -1])
        whole = model(**inputs, logits_to_keep=1).logits[:, -1]  # as generate() prefills
    assert torch.equal(ours, whole), f"max abs diff {(ours - whole).abs().max()}"
