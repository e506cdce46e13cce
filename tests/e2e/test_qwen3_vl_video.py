"""Qwen3-VL video through the three services (separate processes) against transformers run whole:
the timestamps its processor writes before each frame group (so one video is several placeholder
runs), mRoPE per run, and deepstack rows at the video positions beside the images'.

Unlike the images, the tiny checkpoint's deepstack moves the video cases' tokens without scaling
(test_deepstack_matters_for_video): their parity alone shows the deepstack rows reach the LLM.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_named, slice_rows, to_named
from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.media import video_bytes
from tests.parity import MAX_NEW_TOKENS, VIDEO_CASES, family_services, media_parity_tests
from tests.reference import OtherMedia, hf_generate

CASES = {
    **VIDEO_CASES,
    # 2.5 s at 8 fps: 5 frames at 2 fps, padded to 6 by the processor: 3 timestamped runs, the last
    # one's time from a repeated frame index.
    "video-odd-frames": ("What happens?", [], OtherMedia(videos=(video_bytes(seconds=2.5, seed=4),))),
}

services = family_services("qwen3_vl")
test_video_parity = media_parity_tests("qwen3_vl", CASES)


@pytest.fixture(scope="module")
def zeroed(tmp_path_factory) -> Path:
    """The tiny checkpoint with its deepstack rows zeroed: transformers without deepstack."""
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x0", 0.0)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["video", "image-and-video"])
def test_deepstack_matters_for_video(zeroed, case):
    """Power of the parity above: without deepstack, transformers itself decodes other tokens."""
    prompt, images, other = CASES[case]
    expected = hf_generate(tiny_checkpoint("qwen3_vl"), prompt, images, MAX_NEW_TOKENS, other=other)
    assert hf_generate(zeroed, prompt, images, MAX_NEW_TOKENS, other=other) != expected


@pytest.mark.e2e
def test_llm_gets_a_run_per_frame_group(services):
    """The processor's request: one video item, one LLM input per timestamped run, each with its frame
    group's grid and its slice of the item's rows (sent so, straight to the LLM: transformers' tokens);
    the LLM refuses a run whose grid has several steps."""
    prompt, images, other = CASES["video-odd-frames"]
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
