"""Both encoder inputs end to end, the three services as separate processes, token-exact vs transformers.

Media mode (`--encoder-input media`, the default, so every family's parity test runs it too): the
processor sends the encoder each image's file; the encoder decodes it and runs the HF processor
itself. Here on Qwen2-VL (variable grids) and Phi-4-MM (crops padded across a request's images, the
family whose features depend on the batch), checking that the files, not tensors, travel. Tensor
mode (`--encoder-input tensors`): the HF processor's outputs travel, on Qwen2-VL."""

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

AUTO_CLASS = {"qwen2_vl": "AutoModelForImageTextToText", "phi4mm": "AutoModelForCausalLM"}


@pytest.fixture(scope="module", params=[("qwen2_vl", "media"), ("phi4mm", "media"), ("qwen2_vl", "tensors")],
                ids=lambda p: "-".join(p))
def mode_services(request):
    family, mode = request.param
    if (family, mode) == ("qwen2_vl", "media"):  # the default flags: the session's Qwen2-VL services (conftest.py)
        yield family, mode, request.getfixturevalue("qwen2_vl_services")
        return
    model_dir = tiny_checkpoint(family)
    encoder, llm = start_encoder(model_dir), start_llm(model_dir)
    processor = start_processor(model_dir, wait_listening(encoder), wait_listening(llm), None,
                                "--encoder-input", mode)
    services = ServiceSet(encoder, llm, processor)
    try:
        wait_listening(processor)
        for proc in (encoder, llm, processor):
            wait_serving(proc.address)
        yield family, mode, services
    finally:
        services.stop()


@pytest.mark.e2e
def test_encoder_input_mode_is_token_exact(mode_services):
    family, mode, services = mode_services
    model_dir = tiny_checkpoint(family)
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        for case in ("one-image", "one-image-other", "two-images"):
            prompt, images = CASES[case]
            messages = build_messages(prompt, images)
            sampling = generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)
            # What goes to the encoder: the files as sent and no tensors, or tensors and no files.
            encode = stub.Preprocess(processor_pb2.PreprocessRequest(messages=messages, sampling=sampling),
                                     timeout=120).encode_request
            if mode == "media":
                assert [item.media.data for item in encode.items] == images
                assert all(not item.tensors for item in encode.items)
            else:
                assert all(item.tensors and not item.HasField("media") for item in encode.items)
            completion = stub.Generate(processor_pb2.GenerateRequest(messages=messages, sampling=sampling),
                                       timeout=300).completion
            expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS, AUTO_CLASS[family])
            assert list(completion.token_ids) == expected, case
