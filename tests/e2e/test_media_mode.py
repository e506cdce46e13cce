"""Media mode end to end: the processor (`--encoder-input media`) sends the encoder each image's file,
the encoder decodes it and runs the HF processor itself; the three services, as separate processes,
still give transformers' greedy tokens. Qwen2-VL (variable grids) and Phi-4-MM (crops padded across
a request's images, the family whose features depend on the batch)."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.parity import CASES, MAX_NEW_TOKENS
from tests.procs import ServiceSet, start_encoder, start_llm, start_processor, wait_listening, wait_serving
from tests.reference import hf_generate

FAMILIES = {"qwen2_vl": "AutoModelForImageTextToText", "phi4mm": "AutoModelForCausalLM"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def media_services(request):
    model_dir = tiny_checkpoint(request.param)
    encoder, llm = start_encoder(model_dir), start_llm(model_dir)
    processor = start_processor(model_dir, wait_listening(encoder), wait_listening(llm), None,
                                "--encoder-input", "media")
    services = ServiceSet(encoder, llm, processor)
    try:
        wait_listening(processor)
        for proc in (encoder, llm, processor):
            wait_serving(proc.address)
        yield request.param, services
    finally:
        services.stop()


@pytest.mark.e2e
def test_media_mode_is_token_exact(media_services):
    family, services = media_services
    model_dir = tiny_checkpoint(family)
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        for case in ("one-image", "one-image-other", "two-images"):
            prompt, images = CASES[case]
            messages = build_messages(prompt, images)
            sampling = generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
            # What goes to the encoder: the files as sent, no tensors.
            encode = stub.Preprocess(processor_pb2.PreprocessRequest(messages=messages, sampling=sampling),
                                     timeout=120).encode_request
            assert [item.media.data for item in encode.items] == images
            assert all(not item.tensors for item in encode.items)
            completion = stub.Generate(processor_pb2.GenerateRequest(messages=messages, sampling=sampling),
                                       timeout=300).completion
            expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS, FAMILIES[family])
            assert list(completion.token_ids) == expected, case
