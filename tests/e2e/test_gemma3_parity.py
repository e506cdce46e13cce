"""Gemma 3: the three services give transformers' greedy tokens, bidirectional image attention included.

At prefill Gemma 3 lets the soft tokens of one image attend to each other both ways (transformers
builds the masks from the processor's token_type_ids; sliding layers keep their window). A split
that ran the prefill with a plain causal mask would still produce plausible tokens, so parity
proves the masks right only if the masks matter: on the tiny checkpoint, transformers itself must
decode other tokens when token_type_ids are left out (plain causal masks), for every image case.
"""

from __future__ import annotations

import io
from functools import lru_cache

import grpc
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from services.client import build_messages
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import InvalidArgument, error_info
from services.models.base import PlacedEmbeddings
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import CASES, MAX_NEW_TOKENS, family_services, model_info_test, parity_tests
from tests.reference import hf_generate

services = family_services("gemma3")
test_parity = parity_tests("gemma3")
test_model_info = model_info_test("gemma3")

IMAGE_CASES = ["one-image", "one-image-other", "two-images"]


@lru_cache(maxsize=1)
def _model_and_processor():
    model_dir = tiny_checkpoint("gemma3")
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, model, AutoProcessor.from_pretrained(model_dir)


def _hf_inputs(prompt: str, images: list[bytes]):
    """What tests/reference.py feeds model.generate: the chat template, then the processor."""
    _, _, processor = _model_and_processor()
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    pil_images = [Image.open(io.BytesIO(data)) for data in images]
    return text, pil_images, processor(text=[text], images=pil_images or None, return_tensors="pt")


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bidirectional_image_mask_changes_tokens(case):
    """Power for test_parity: with plain causal masks transformers itself decodes other tokens."""
    model_dir, model, _ = _model_and_processor()
    prompt, images = CASES[case]
    _, _, inputs = _hf_inputs(prompt, images)
    assert inputs["token_type_ids"].sum() > 0
    causal_inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
    with torch.inference_mode():
        causal = model.generate(**causal_inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    causal_tokens = causal[0, inputs["input_ids"].shape[1]:].tolist()
    assert hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS) != causal_tokens


@pytest.mark.parametrize("case", ["text-only", *IMAGE_CASES])
def test_prefill_logits_equal_the_whole_model(case):
    """In process: the family's encode + prefill give the whole model's last logits bit for bit,
    and differ from the plain-causal ones wherever there is an image."""
    model_dir, model, processor = _model_and_processor()
    family = family_for(model_dir)
    prompt, images = CASES[case]
    text, pil_images, inputs = _hf_inputs(prompt, images)
    processed = family.preprocess(processor, text, pil_images)
    assert processed.token_ids == inputs["input_ids"][0].tolist()
    with torch.inference_mode():
        rows = family.encode(model, "image", [item.encoder_inputs for item in processed.items]) if images else []
        placed = [PlacedEmbeddings(item.modality, item.offset, item.length, emb, item.position_inputs)
                  for item, emb in zip(processed.items, rows)]
        token_ids = torch.tensor(processed.token_ids)
        prefill = family.prefill_inputs(model, token_ids, placed)
        kwargs = dict(inputs_embeds=prefill.inputs_embeds, attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                      past_key_values=family.new_cache(model), use_cache=True)
        out = family.language_model(model)(**(kwargs | prefill.layer_kwargs))  # as the engine calls it
        ours = family.lm_head(model)(out.last_hidden_state[:, -1])
        # logits_to_keep=1: lm_head on the last position only, as generate() runs it (and the engine)
        whole = model(**inputs, logits_to_keep=1).logits[:, -1]
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}, logits_to_keep=1).logits[:, -1]
    assert torch.equal(ours, whole), f"max abs diff {(ours - whole).abs().max()}"
    if images:
        assert not torch.allclose(whole, causal, atol=1e-3)


class _PanAndScan:
    """The processor with pan-and-scan forced on (Gemma3Processor's own default turns it off)."""

    def __init__(self, processor):
        self._processor = processor

    def __getattr__(self, name):
        return getattr(self._processor, name)

    def __call__(self, **kwargs):
        return self._processor(**kwargs, do_pan_and_scan=True, pan_and_scan_min_crop_size=8,
                               pan_and_scan_min_ratio_to_activate=1.0, pan_and_scan_max_num_crops=4)


def test_image_tokens_per_image_and_pan_and_scan_refused():
    model_dir, _, processor = _model_and_processor()
    family = family_for(model_dir)
    prompt, images = CASES["two-images"]
    text, pil_images, _ = _hf_inputs(prompt, images)
    processed = family.preprocess(processor, text, pil_images)
    assert [item.length for item in processed.items] == [family.tokens_per_image] * 2
    boi = processor.tokenizer.convert_tokens_to_ids("<start_of_image>")
    eoi = processor.tokenizer.convert_tokens_to_ids("<end_of_image>")
    for item in processed.items:
        assert processed.token_ids[item.offset - 1] == boi
        assert processed.token_ids[item.offset + item.length] == eoi
    assert processed.token_ids.count(processor.tokenizer.bos_token_id) == 1

    # Pan-and-scan crops would give one image several placeholder runs: refused, never mis-cut.
    with pytest.raises(InvalidArgument) as caught:
        family.preprocess(_PanAndScan(processor), text, pil_images)
    assert caught.value.reason == "PAN_AND_SCAN_UNSUPPORTED"


@pytest.mark.e2e
def test_roles_that_do_not_alternate_are_invalid_argument(services):
    """Gemma's chat template raises on two user turns in a row: a clear INVALID_ARGUMENT."""
    request = processor_pb2.GenerateRequest(messages=[*build_messages("one", []), *build_messages("two", [])])
    with grpc.insecure_channel(services.address) as channel, pytest.raises(grpc.RpcError) as caught:
        processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "CHAT_TEMPLATE_REJECTED", caught.value.details()
