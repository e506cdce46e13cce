"""The central promise on Qwen2-VL: the three services, as separate processes, give the
same greedy tokens as the whole model in transformers, token by token."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes
from tests.reference import hf_generate, hf_prompt_tokens

MAX_NEW_TOKENS = 12

CASES = {
    "text-only": ("Tell me a story about the sea.", []),
    "text-only-2": ("What is two plus two?", []),
    "one-image-64": ("Describe this image.", [image_bytes(64, 64, seed=1, kind="gradient")]),
    "one-image-224": ("Describe this image.", [image_bytes(224, 224, seed=2)]),
    "one-image-wide": ("What colours do you see?", [image_bytes(300, 120, seed=3, kind="gradient")]),
    "one-image-jpeg": ("Describe this image.", [image_bytes(150, 200, seed=4, fmt="JPEG")]),
    "two-images": ("Compare the two pictures.", [image_bytes(96, 96, seed=5), image_bytes(128, 64, seed=6, kind="gradient")]),
}


@pytest.fixture(scope="module")
def stub(qwen2_vl_services):
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def _greedy(max_new_tokens: int = MAX_NEW_TOKENS) -> generation_pb2.SamplingParams:
    return generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_tokens_match_transformers(stub, qwen2_vl_dir, case):
    prompt, images = CASES[case]
    expected = hf_generate(qwen2_vl_dir, prompt, images, MAX_NEW_TOKENS)
    reply = stub.Generate(processor_pb2.GenerateRequest(messages=build_messages(prompt, images), sampling=_greedy()),
                          timeout=120)
    assert list(reply.completion.token_ids) == expected
    assert reply.completion.prompt_tokens == hf_prompt_tokens(qwen2_vl_dir, prompt, images)
    assert reply.completion.completion_tokens == len(expected)


@pytest.mark.e2e
def test_reference_outputs_depend_on_prompt_and_image(qwen2_vl_dir):
    """Guards the parity test's power: on a model that ignored its inputs, parity would prove nothing."""
    outputs = {case: tuple(hf_generate(qwen2_vl_dir, p, imgs, MAX_NEW_TOKENS)) for case, (p, imgs) in CASES.items()}
    assert outputs["text-only"] != outputs["text-only-2"]
    assert outputs["one-image-64"] != outputs["one-image-224"]  # same prompt, other image
    assert len(set(outputs.values())) >= len(outputs) - 1
    assert all(len(set(o)) > 1 for o in outputs.values()), "every output is one repeated token"


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["text-only", "two-images"])
def test_stream_matches_unary(stub, case):
    prompt, images = CASES[case]
    messages = build_messages(prompt, images)
    unary = stub.Generate(processor_pb2.GenerateRequest(messages=messages, sampling=_greedy()), timeout=120).completion
    events = list(stub.StreamGenerate(processor_pb2.StreamGenerateRequest(messages=messages, sampling=_greedy()),
                                      timeout=120))
    final = events[-1]
    assert final.HasField("completion") and all(not e.HasField("completion") for e in events[:-1])
    streamed_ids = [t for e in events[:-1] for t in e.token_ids]
    assert streamed_ids == list(unary.token_ids) == list(final.completion.token_ids)
    assert "".join(e.text_delta for e in events[:-1]) == final.completion.text == unary.text
    assert final.completion.finish_reason == unary.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
