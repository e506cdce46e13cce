"""Deadlines and seeded sampling through the processor. Bad input (images, URLs, text, sampling ranges,
media, direct calls) is the corpus in tests/reliability/corpus.py, driven by tests/reliability/test_corpus.py."""

from __future__ import annotations

import grpc
import pytest

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes

pytestmark = pytest.mark.e2e

GOOD_IMAGE = image_bytes(64, 64, seed=11)


@pytest.fixture(scope="module")
def stub(qwen2_vl_services):
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def _generate(stub, parts, sampling=None, timeout=30):
    request = processor_pb2.GenerateRequest(
        messages=[processor_pb2.ChatMessage(role="user", content=parts)],
        sampling=sampling or generation_pb2.SamplingParams(max_new_tokens=4))
    return stub.Generate(request, timeout=timeout)


def _image_part(**media) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(image=processor_pb2.Media(**media))


def _text(text: str) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(text=text)


def test_deadline_is_honoured(stub):
    with pytest.raises(grpc.RpcError) as caught:
        _generate(stub, [_text("Write a long story.")],
                  generation_pb2.SamplingParams(max_new_tokens=100_000, ignore_eos=True), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _generate(stub, [_text("still there?")]).completion.completion_tokens > 0


def test_sampling_with_seed_is_reproducible(stub):
    sampling = generation_pb2.SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = _generate(stub, [_image_part(data=GOOD_IMAGE), _text("a")], sampling)
    second = _generate(stub, [_image_part(data=GOOD_IMAGE), _text("a")], sampling)
    assert list(first.completion.token_ids) == list(second.completion.token_ids)
