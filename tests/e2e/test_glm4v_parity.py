"""GLM-4.1V: the three services (separate processes) give transformers' greedy tokens (images, video and
text; mRoPE on the rotary half of each head, computed by the model's own get_rope_index), and a prompt
with images and a video, which transformers' model rejects, is refused."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("glm4v")
test_parity = parity_tests("glm4v")
test_model_info = model_info_test("glm4v")
# A video is one timestamped <|image|> run per frame group, inside <|begin_of_video|>...<|end_of_video|>.
test_video_parity = media_parity_tests("glm4v", {case: VIDEO_CASES[case] for case in ("video", "video-other")})


@pytest.mark.e2e
def test_images_with_a_video_are_refused(services):
    prompt, images, other = VIDEO_CASES["image-and-video"]
    messages = build_messages(prompt, images, media=[("video", video) for video in other.videos])
    with grpc.insecure_channel(services.address) as channel, pytest.raises(grpc.RpcError) as caught:
        processor_pb2_grpc.ProcessorServiceStub(channel).Generate(processor_pb2.GenerateRequest(messages=messages),
                                                                  timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "MODALITY_UNSUPPORTED", caught.value.details()
