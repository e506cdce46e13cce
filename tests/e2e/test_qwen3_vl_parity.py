"""Qwen3-VL through the three services (separate processes) against transformers run whole, images
and video, deepstack included.

Images: with random weights deepstack barely moves the logits (DESIGN 4.3), so parity on the tiny
checkpoint alone would not show that the deepstack rows travel from the encoder to the LLM's
first layers. A variant with the deepstack mergers' output scaled x30 makes them matter; on it,
transformers itself must change its tokens when deepstack is zeroed, and the services must still
match transformers run whole.

Video: the timestamps its processor writes before each frame group (so one video is several
placeholder runs), mRoPE per run, and deepstack rows at the video positions beside the images'.
Unlike the images, the tiny checkpoint's deepstack moves the video cases' tokens without scaling
(test_deepstack_matters_for_video): their parity alone shows the deepstack rows reach the LLM.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoConfig

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_named, from_proto, slice_rows, to_named
from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.inproc import InProcessServices
from tests.media import video_bytes
from tests.parity import (
    CASES,
    MAX_NEW_TOKENS,
    VIDEO_CASES,
    family_services,
    media_parity_tests,
    model_info_test,
    parity_tests,
)
from tests.reference import OtherMedia, hf_generate

MEDIA_CASES = {
    **VIDEO_CASES,
    # 2.5 s at 8 fps: 5 frames at 2 fps, padded to 6 by the processor: 3 timestamped runs, the last
    # one's time from a repeated frame index.
    "video-odd-frames": ("What happens?", [], OtherMedia(videos=(video_bytes(seconds=2.5, seed=4),))),
}

services = family_services("qwen3_vl")
test_parity = parity_tests("qwen3_vl")
test_model_info = model_info_test("qwen3_vl")
test_video_parity = media_parity_tests("qwen3_vl", MEDIA_CASES)

DEEPSTACK_SCALE = 30.0
IMAGE_CASES = ["one-image", "one-image-other", "two-images"]


@pytest.fixture(scope="module")
def boosted(tmp_path_factory) -> Path:
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x30",
                    DEEPSTACK_SCALE)


@pytest.fixture(scope="module")
def zeroed(boosted, tmp_path_factory) -> Path:
    """The boosted variant with its deepstack rows zeroed: transformers without deepstack."""
    return scaled_deepstack(boosted, tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x0", 0.0)


@pytest.fixture(scope="module")
def boosted_services(boosted):
    started = InProcessServices(boosted)
    yield started
    started.stop()


def _generate(address: str, prompt: str, images: list[bytes]) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        request = processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        return list(processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion.token_ids)


@pytest.mark.e2e
@pytest.mark.parametrize("case", IMAGE_CASES)
def test_deepstack_is_carried(boosted, zeroed, boosted_services, case):
    prompt, images = CASES[case]
    expected = hf_generate(boosted, prompt, images, MAX_NEW_TOKENS)
    # Power: transformers itself, with the deepstack rows zeroed, decodes other tokens.
    assert hf_generate(zeroed, prompt, images, MAX_NEW_TOKENS) != expected
    assert _generate(boosted_services.address, prompt, images) == expected


@pytest.mark.e2e
def test_encoder_returns_one_deepstack_tensor_per_layer(boosted, boosted_services):
    config = AutoConfig.from_pretrained(boosted)
    num_layers, hidden = len(config.vision_config.deepstack_visual_indexes), config.text_config.hidden_size
    assert num_layers >= 2
    prompt, images = CASES["two-images"]
    with grpc.insecure_channel(boosted_services.address) as front, \
            grpc.insecure_channel(boosted_services.encoder_address) as enc:
        pre = processor_pb2_grpc.ProcessorServiceStub(front).Preprocess(
            processor_pb2.PreprocessRequest(messages=build_messages(prompt, images)), timeout=60)
        encoded = encoder_pb2_grpc.EncoderServiceStub(enc).Encode(pre.encode_request, timeout=60)
    ranges = [mm.placeholder for mm in pre.llm_request.prompt.multimodal_inputs]
    for item, placeholder in zip(encoded.items, ranges, strict=True):
        assert len(item.deepstack_embeddings) == num_layers
        for tensor in item.deepstack_embeddings:
            assert tuple(from_proto(tensor).shape) == tuple(from_proto(item.embeddings).shape) == (placeholder.length, hidden)


@pytest.mark.e2e
def test_llm_refuses_embeddings_without_deepstack(boosted_services):
    """A router that forwards only the embeddings gets a clear error, not silently other tokens."""
    prompt, images = CASES["one-image"]
    processor = boosted_services.processor
    with grpc.insecure_channel(boosted_services.address) as front, \
            grpc.insecure_channel(boosted_services.encoder_address) as enc, \
            grpc.insecure_channel(processor.llm.address) as llm:
        pre = processor_pb2_grpc.ProcessorServiceStub(front).Preprocess(
            processor_pb2.PreprocessRequest(messages=build_messages(prompt, images)), timeout=60)
        encoded = encoder_pb2_grpc.EncoderServiceStub(enc).Encode(pre.encode_request, timeout=60)
        request = llm_pb2.GenerateRequest()
        request.CopyFrom(pre.llm_request)
        for mm, item in zip(request.prompt.multimodal_inputs, encoded.items):
            mm.embeddings.CopyFrom(item.embeddings)  # deepstack_embeddings left out
        with pytest.raises(grpc.RpcError) as caught:
            llm_pb2_grpc.LlmServiceStub(llm).Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "DEEPSTACK_COUNT_MISMATCH", caught.value.details()


@pytest.fixture(scope="module")
def zeroed_tiny(tmp_path_factory) -> Path:
    """The tiny checkpoint with its deepstack rows zeroed: transformers without deepstack."""
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x0", 0.0)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["video", "image-and-video"])
def test_deepstack_matters_for_video(zeroed_tiny, case):
    """Power of test_video_parity: without deepstack, transformers itself decodes other tokens."""
    prompt, images, other = MEDIA_CASES[case]
    expected = hf_generate(tiny_checkpoint("qwen3_vl"), prompt, images, MAX_NEW_TOKENS, other=other)
    assert hf_generate(zeroed_tiny, prompt, images, MAX_NEW_TOKENS, other=other) != expected


@pytest.mark.e2e
def test_llm_gets_a_run_per_frame_group(services):
    """The processor's request: one video item, one LLM input per timestamped run, each with its frame
    group's grid and its slice of the item's rows (sent so, straight to the LLM: transformers' tokens);
    the LLM refuses a run whose grid has several steps."""
    prompt, images, other = MEDIA_CASES["video-odd-frames"]
    with grpc.insecure_channel(services.address) as front, grpc.insecure_channel(services.encoder.address) as enc, \
            grpc.insecure_channel(services.llm.address) as llm:
        pre = processor_pb2_grpc.ProcessorServiceStub(front).Preprocess(
            processor_pb2.PreprocessRequest(messages=build_messages(prompt, images, media=[("video", other.videos[0])]),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)),
            timeout=60)
        (item,) = pre.encode_request.items
        t, h, w = from_named(item.tensors)["video_grid_thw"][0].tolist()
        runs = pre.llm_request.prompt.multimodal_inputs
        assert t == 3 and len(runs) == t
        for step, mm in enumerate(runs):
            assert mm.placeholder.mm_hash == item.mm_hash and mm.placeholder.length == h * w // 4
            assert mm.placeholder.embedding_offset == step * mm.placeholder.length
            assert from_named(mm.position_inputs)["video_grid_thw"].tolist() == [[1, h, w]]
        (encoded,) = encoder_pb2_grpc.EncoderServiceStub(enc).Encode(pre.encode_request, timeout=60).items
        request = llm_pb2.GenerateRequest()
        request.CopyFrom(pre.llm_request)
        for mm in request.prompt.multimodal_inputs:  # the processor's way: each run its rows of the item's
            rows = slice(mm.placeholder.embedding_offset, mm.placeholder.embedding_offset + mm.placeholder.length)
            mm.embeddings.CopyFrom(slice_rows(encoded.embeddings, rows))
            mm.deepstack_embeddings.extend(slice_rows(d, rows) for d in encoded.deepstack_embeddings)
        expected = hf_generate(tiny_checkpoint("qwen3_vl"), prompt, images, MAX_NEW_TOKENS, other=other)
        assert list(llm_pb2_grpc.LlmServiceStub(llm).Generate(request, timeout=60).token_ids) == expected
        del request.prompt.multimodal_inputs[1].position_inputs[:]
        request.prompt.multimodal_inputs[1].position_inputs.extend(to_named({"video_grid_thw": torch.tensor([[2, h, w]])}))
        with pytest.raises(grpc.RpcError) as caught:
            llm_pb2_grpc.LlmServiceStub(llm).Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "POSITION_INPUT_INVALID", caught.value.details()
