"""LLaVA-NeXT parity: the three services against LlavaNextForConditionalGeneration run whole.

The harness's images (160x120, 96x200, 96x96 + 128x64) land on different anyres grids, so their
placeholder runs have different lengths and the two-image case carries zero-padded tiles. The
extra cases add extreme aspect ratios, where unpadding removes most of the tiled grid.
"""

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes
from tests.parity import MAX_NEW_TOKENS, family_services, model_info_test, parity_tests
from tests.reference import hf_generate, hf_prompt_tokens

services = family_services("llava_next")
test_parity = parity_tests("llava_next")
test_model_info = model_info_test("llava_next")

EXTREME = {
    "wide": ("What colours do you see?", [image_bytes(300, 40, seed=7, kind="gradient")]),
    "tall-then-wide": ("Compare the two pictures.", [image_bytes(40, 300, seed=8), image_bytes(250, 60, seed=9)]),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(EXTREME))
def test_extreme_aspect_ratios(services, case):
    model_dir = tiny_checkpoint("llava_next")
    prompt, images = EXTREME[case]
    expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS)
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        request = processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        completion = stub.Generate(request, timeout=300).completion
    assert list(completion.token_ids) == expected
    assert completion.prompt_tokens == hf_prompt_tokens(model_dir, prompt, images)
