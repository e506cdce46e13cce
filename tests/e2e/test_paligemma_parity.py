"""PaliGemma 2: the three services give transformers' greedy tokens, prefix-LM attention included.

At prefill PaliGemma lets the whole prompt (its images and the prefix text) attend both ways
(transformers builds the masks from the processor's token_type_ids, 0 on the prompt; sliding layers
keep their window). A split that ran the prefill with plain causal masks would still produce plausible
tokens, so parity proves the masks right only if the masks matter: on the tiny checkpoint,
transformers itself must decode other tokens when token_type_ids are left out, for every image case.
A prompt without an image, which PaliGemma's processor refuses, is INVALID_ARGUMENT IMAGE_REQUIRED.
"""

from __future__ import annotations

import io

import grpc
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import CASES, MAX_NEW_TOKENS, family_services, model_info_test, parity_tests
from tests.reference import _load, hf_generate

IMAGE_CASES = ("one-image", "one-image-other", "two-images")

services = family_services("paligemma")
test_parity = parity_tests("paligemma", cases=IMAGE_CASES)
test_model_info = model_info_test("paligemma")


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_prefix_lm_mask_changes_tokens(case):
    """Power for test_parity: with plain causal masks transformers itself decodes other tokens."""
    model_dir = tiny_checkpoint("paligemma")
    model, processor = _load(model_dir, "AutoModelForImageTextToText")
    prompt, images = CASES[case]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False)
    inputs = processor(text=[text], images=[Image.open(io.BytesIO(data)) for data in images], return_tensors="pt")
    assert inputs["token_type_ids"].sum() == 0  # the whole prompt is the bidirectional prefix
    causal_inputs = {k: v for k, v in inputs.items() if k not in ("token_type_ids", "labels")}
    with torch.inference_mode():
        causal = model.generate(**causal_inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS) != causal[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.e2e
def test_text_only_is_image_required(services):
    prompt, _ = CASES["text-only"]
    request = processor_pb2.GenerateRequest(messages=build_messages(prompt, []),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    with grpc.insecure_channel(services.address) as channel, pytest.raises(grpc.RpcError) as caught:
        processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "IMAGE_REQUIRED", caught.value.details()


def test_a_checkpoint_without_chat_template_gets_paligemmas_prompt_format():
    """Real PaliGemma checkpoints carry no chat template: the family writes the images, then the user's text."""
    model_dir = tiny_checkpoint("paligemma")
    family = family_for(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.chat_template = None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": " caption en "}]}]
    assert family.render_chat(processor, messages) == "<image><image>caption en"
