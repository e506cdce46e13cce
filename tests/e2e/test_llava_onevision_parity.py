"""LLaVA-OneVision through the three services (separate processes) against transformers run whole.

Images: anyres tiles whose unpadded grid the model shrinks past "anyres_max_9" (the tiny 56 px tiles
reach it with the harness's images), each image tiled on its own in the two-image case. Video: frames
chosen by the model's own video processor at 2 fps, each frame one tile pooled to half its patch grid,
one image_newline row closing the clip; with an image before it in one prompt."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes
from tests.parity import MAX_NEW_TOKENS, VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests
from tests.reference import hf_generate, hf_prompt_tokens

services = family_services("llava_onevision")
test_parity = parity_tests("llava_onevision")
test_model_info = model_info_test("llava_onevision")
test_video_parity = media_parity_tests("llava_onevision", VIDEO_CASES)


@pytest.mark.e2e
@pytest.mark.parametrize("size", [(320, 240), (400, 90)])  # (width, height)
def test_parity_of_large_images(services, size):
    """320 x 240: its unpadded grid passes anyres_max_9 and the model shrinks it (the bilinear shrink in
    the encoder, the row count in the processor); 400 x 90: a wide grid unpadded to a quarter of its
    rows (tests/models/test_llava_onevision.py pins both)."""
    model_dir = tiny_checkpoint("llava_onevision")
    prompt, images = "Describe this image.", [image_bytes(*size, seed=7)]
    expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS)
    with grpc.insecure_channel(services.address) as channel:
        request = processor_pb2.GenerateRequest(
            messages=build_messages(prompt, images),
            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        completion = processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion
    assert list(completion.token_ids) == expected
    assert completion.prompt_tokens == hf_prompt_tokens(model_dir, prompt, images)
