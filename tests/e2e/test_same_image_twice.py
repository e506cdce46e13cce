"""The same image twice in one request is encoded once, and the answer is still the whole model's."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes
from tests.reference import hf_generate

pytestmark = pytest.mark.e2e

IMAGE, OTHER = image_bytes(96, 80, seed=71), image_bytes(64, 64, seed=72, kind="gradient")
MAX_NEW_TOKENS = 10


@pytest.fixture(scope="module")
def stub(qwen2_vl_services):
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def test_each_mm_hash_is_sent_to_the_encoder_once(stub):
    pre = stub.Preprocess(processor_pb2.PreprocessRequest(messages=build_messages("Compare.", [IMAGE, OTHER, IMAGE])),
                          timeout=60)
    hashes = [mm.placeholder.mm_hash for mm in pre.llm_request.prompt.multimodal_inputs]
    assert len(hashes) == 3 and hashes[0] == hashes[2] != hashes[1]
    assert [item.mm_hash for item in pre.encode_request.items] == [hashes[0], hashes[1]]


@pytest.mark.parametrize("images", [[IMAGE, IMAGE], [IMAGE, OTHER, IMAGE]], ids=["twice", "twice-around-another"])
def test_repeated_image_matches_transformers(stub, qwen2_vl_dir, images):
    expected = hf_generate(qwen2_vl_dir, "Compare the pictures.", images, MAX_NEW_TOKENS)
    reply = stub.Generate(processor_pb2.GenerateRequest(
        messages=build_messages("Compare the pictures.", images),
        sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=120)
    assert list(reply.completion.token_ids) == expected
