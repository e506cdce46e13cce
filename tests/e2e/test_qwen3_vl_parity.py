"""Qwen3-VL: the three services give transformers' greedy tokens, deepstack included.

With random weights deepstack barely moves the logits (DESIGN 4.3), so parity on the tiny
checkpoint alone would not show that the deepstack rows travel from the encoder to the LLM's
first layers. A variant with the deepstack mergers' output scaled x30 makes them matter; on it,
transformers itself must change its tokens when deepstack is zeroed, and the services must still
match transformers run whole.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from transformers import AutoConfig

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_proto
from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.inproc import InProcessServices
from tests.parity import CASES, MAX_NEW_TOKENS, family_services, model_info_test, parity_tests
from tests.reference import hf_generate

services = family_services("qwen3_vl")
test_parity = parity_tests("qwen3_vl")
test_model_info = model_info_test("qwen3_vl")

DEEPSTACK_SCALE = 30.0
IMAGE_CASES = ["one-image", "one-image-other", "two-images"]


@pytest.fixture(scope="module")
def boosted(tmp_path_factory) -> Path:
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x30",
                    DEEPSTACK_SCALE)


@pytest.fixture(scope="module")
def zeroed(boosted, tmp_path_factory) -> Path:
    """The boosted variant with its deepstack rows zeroed: transformers without deepstack."""
    return scaled_deepstack(boosted, tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x0", 0.0)


@pytest.fixture(scope="module")
def boosted_services(boosted):
    started = InProcessServices(boosted)
    yield started
    started.stop()


def _generate(address: str, prompt: str, images: list[bytes]) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        request = processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        return list(processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion.token_ids)


@pytest.mark.e2e
@pytest.mark.parametrize("case", IMAGE_CASES)
def test_deepstack_is_carried(boosted, zeroed, boosted_services, case):
    prompt, images = CASES[case]
    expected = hf_generate(boosted, prompt, images, MAX_NEW_TOKENS)
    # Power: transformers itself, with the deepstack rows zeroed, decodes other tokens.
    assert hf_generate(zeroed, prompt, images, MAX_NEW_TOKENS) != expected
    assert _generate(boosted_services.address, prompt, images) == expected


@pytest.mark.e2e
def test_encoder_returns_one_deepstack_tensor_per_layer(boosted, boosted_services):
    config = AutoConfig.from_pretrained(boosted)
    num_layers, hidden = len(config.vision_config.deepstack_visual_indexes), config.text_config.hidden_size
    assert num_layers >= 2
    prompt, images = CASES["two-images"]
    with grpc.insecure_channel(boosted_services.address) as front, \
            grpc.insecure_channel(boosted_services.encoder_address) as enc:
        pre = processor_pb2_grpc.ProcessorServiceStub(front).Preprocess(
            processor_pb2.PreprocessRequest(messages=build_messages(prompt, images)), timeout=60)
        encoded = encoder_pb2_grpc.EncoderServiceStub(enc).Encode(pre.encode_request, timeout=60)
    ranges = [mm.placeholder for mm in pre.llm_request.prompt.multimodal_inputs]
    for item, placeholder in zip(encoded.items, ranges, strict=True):
        assert len(item.deepstack_embeddings) == num_layers
        for tensor in item.deepstack_embeddings:
            assert tuple(from_proto(tensor).shape) == tuple(from_proto(item.embeddings).shape) == (placeholder.length, hidden)


@pytest.mark.e2e
def test_llm_refuses_embeddings_without_deepstack(boosted_services):
    """A router that forwards only the embeddings gets a clear error, not silently other tokens."""
    prompt, images = CASES["one-image"]
    processor = boosted_services.processor
    with grpc.insecure_channel(boosted_services.address) as front, \
            grpc.insecure_channel(boosted_services.encoder_address) as enc, \
            grpc.insecure_channel(processor.llm.address) as llm:
        pre = processor_pb2_grpc.ProcessorServiceStub(front).Preprocess(
            processor_pb2.PreprocessRequest(messages=build_messages(prompt, images)), timeout=60)
        encoded = encoder_pb2_grpc.EncoderServiceStub(enc).Encode(pre.encode_request, timeout=60)
        request = llm_pb2.GenerateRequest()
        request.CopyFrom(pre.llm_request)
        for mm, item in zip(request.prompt.multimodal_inputs, encoded.items):
            mm.embeddings.CopyFrom(item.embeddings)  # deepstack_embeddings left out
        with pytest.raises(grpc.RpcError) as caught:
            llm_pb2_grpc.LlmServiceStub(llm).Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "DEEPSTACK_COUNT_MISMATCH", caught.value.details()
