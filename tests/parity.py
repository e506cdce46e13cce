"""The per-family parity check: the three services (separate processes) against transformers run whole.

A family's test file needs only:

    services = family_services("gemma3")          # module-scoped fixture, one start-up per family
    test_parity = parity_tests("gemma3")          # single image, two images, text-only + power check
"""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes
from tests.procs import start_services
from tests.reference import hf_generate, hf_prompt_tokens

MAX_NEW_TOKENS = 10

CASES = {
    "text-only": ("Tell me a story about the sea.", []),
    "one-image": ("Describe this image.", [image_bytes(160, 120, seed=1)]),
    "one-image-other": ("Describe this image.", [image_bytes(96, 200, seed=2, kind="gradient")]),
    "two-images": ("Compare the two pictures.", [image_bytes(96, 96, seed=5), image_bytes(128, 64, seed=6,
                                                                                        kind="gradient")]),
}


def family_services(family: str, seed: int = 0):
    """A module-scoped fixture: the family's tiny checkpoint served by three processes."""

    @pytest.fixture(scope="module")
    def services():
        started = start_services(tiny_checkpoint(family, seed))
        yield started
        started.stop()

    return services


def parity_tests(family: str, auto_class: str = "AutoModelForImageTextToText", seed: int = 0):
    """Parametrized test: every case's greedy tokens equal transformers', token by token."""

    @pytest.mark.e2e
    @pytest.mark.parametrize("case", list(CASES))
    def test_parity(services, case):
        model_dir = tiny_checkpoint(family, seed)
        prompt, images = CASES[case]
        expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS, auto_class)
        with grpc.insecure_channel(services.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.GenerateRequest(
                messages=build_messages(prompt, images),
                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
            completion = stub.Generate(request, timeout=300).completion
        assert list(completion.token_ids) == expected
        assert completion.prompt_tokens == hf_prompt_tokens(model_dir, prompt, images, auto_class)
        if case == "one-image-other":  # the parity above has power only if the image matters
            assert expected != hf_generate(model_dir, *CASES["one-image"], MAX_NEW_TOKENS, auto_class)
            assert expected != hf_generate(model_dir, *CASES["text-only"], MAX_NEW_TOKENS, auto_class)

    return test_parity
