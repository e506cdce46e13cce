"""Qwen2-Audio: the three services, as separate processes, give transformers' greedy tokens for audio
prompts (one clip, another clip, two clips of different lengths) and text alone; what it refuses."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.checkpoints import tiny_checkpoint
from tests.media import audio_bytes, image_bytes
from tests.parity import AUDIO_CASES, MAX_NEW_TOKENS, family_services, media_parity_tests, model_info_test
from tests.reference import NO_MEDIA, OtherMedia, hf_generate

AUTO_CLASS = "AutoModelForMultimodalLM"  # transformers' Auto class that maps Qwen2AudioForConditionalGeneration

CASES = {
    **AUDIO_CASES,  # "audio" and "audio-other" differ in the clip only: the power check
    "two-audios": ("Compare the two sounds.", [], OtherMedia(audios=(audio_bytes(seed=1),
                                                                     audio_bytes(seconds=1.7, seed=3)))),
    "short-clip": ("What do you hear?", [], OtherMedia(audios=(audio_bytes(seconds=0.4, seed=5),))),
    "text-only": ("Tell me a story about the sea.", [], NO_MEDIA),
}

services = family_services("qwen2_audio")
test_audio_parity = media_parity_tests("qwen2_audio", CASES, auto_class=AUTO_CLASS)
test_model_info = model_info_test("qwen2_audio", modality="audio")


def _expect_invalid(address: str, reason: str, media: list[tuple[str, bytes]], images: list[bytes] = ()) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        request = processor_pb2.GenerateRequest(messages=build_messages("What is it?", images, media=media),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=2))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(request, timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == reason
    return caught.value.details()


@pytest.mark.e2e
def test_refusals_are_clear_and_the_services_go_on(services):
    """An image for an audio-only model, and a clip over the feature extractor's 30 s (transformers would
    drop the rest), are INVALID_ARGUMENT with their reasons; a good clip is served after them."""
    assert "does not take image" in _expect_invalid(services.address, "MODALITY_UNSUPPORTED", [], [image_bytes(64, 64)])
    details = _expect_invalid(services.address, "AUDIO_TOO_LONG", [("audio", audio_bytes(seconds=31, seed=4))])
    assert "at most 30 s" in details
    prompt, _, other = CASES["audio"]
    with grpc.insecure_channel(services.address) as channel:
        request = processor_pb2.GenerateRequest(
            messages=build_messages(prompt, media=[("audio", other.audios[0])]),
            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        completion = processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion
    assert list(completion.token_ids) == hf_generate(tiny_checkpoint("qwen2_audio"), prompt, [], MAX_NEW_TOKENS,
                                                     AUTO_CLASS, other)
