"""An external router: Preprocess, then EncoderService and LlmService called directly, token-exact."""

from __future__ import annotations

import grpc
import pytest
import torch

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.tensors import from_proto
from tests.media import image_bytes
from tests.reference import hf_generate

pytestmark = pytest.mark.e2e

PROMPT, IMAGES = "Describe both.", [image_bytes(80, 60, seed=31), image_bytes(64, 96, seed=32, kind="gradient")]
SAMPLING = generation_pb2.SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def stubs(qwen2_vl_services):
    channels = [grpc.insecure_channel(p.address) for p in
                (qwen2_vl_services.processor, qwen2_vl_services.encoder, qwen2_vl_services.llm)]
    yield (processor_pb2_grpc.ProcessorServiceStub(channels[0]), encoder_pb2_grpc.EncoderServiceStub(channels[1]),
           llm_pb2_grpc.LlmServiceStub(channels[2]))
    for channel in channels:
        channel.close()


@pytest.fixture(scope="module")
def routed(stubs):
    """What a router gets: the preprocessed requests and the encoder's answer."""
    processor, encoder, _ = stubs
    pre = processor.Preprocess(processor_pb2.PreprocessRequest(messages=build_messages(PROMPT, IMAGES),
                                                               sampling=SAMPLING), timeout=60)
    encoded = encoder.Encode(pre.encode_request, timeout=60)
    llm_request = llm_pb2.GenerateRequest()
    llm_request.CopyFrom(pre.llm_request)
    for mm, item in zip(llm_request.prompt.multimodal_inputs, encoded.items):
        assert mm.placeholder.mm_hash == item.mm_hash
        mm.embeddings.CopyFrom(item.embeddings)
    return pre, encoded, llm_request


def test_preprocess_describes_both_requests(routed, qwen2_vl_services):
    pre, encoded, _ = routed
    assert "<|vision_start|>" in pre.prompt_text
    assert len(pre.encode_request.items) == 2 and len(encoded.items) == 2
    ranges = [mm.placeholder for mm in pre.llm_request.prompt.multimodal_inputs]
    assert all(not mm.HasField("embeddings") for mm in pre.llm_request.prompt.multimodal_inputs)
    for r, item in zip(ranges, encoded.items):
        emb = from_proto(item.embeddings)
        assert emb.shape[0] == r.length and emb.dtype == torch.float32
    assert ranges[0].offset + ranges[0].length < ranges[1].offset


def test_router_path_matches_transformers(stubs, routed, qwen2_vl_dir):
    _, _, llm = stubs
    reply = llm.Generate(routed[2], timeout=60)
    assert list(reply.token_ids) == hf_generate(qwen2_vl_dir, PROMPT, IMAGES, 8)


def test_same_image_same_hash(stubs):
    processor = stubs[0]
    pre = processor.Preprocess(processor_pb2.PreprocessRequest(messages=build_messages("x", [IMAGES[0], IMAGES[0]])),
                               timeout=60)
    hashes = [mm.placeholder.mm_hash for mm in pre.llm_request.prompt.multimodal_inputs]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 64
    assert [item.mm_hash for item in pre.encode_request.items] == hashes[:1]  # encoded once


# Malformed router calls (tensor bytes vs shape, dtypes, ranges, fingerprints, NaN...) to the encoder and the
# LLM are entries of the corpus: tests/reliability/corpus.py, driven by tests/reliability/test_corpus.py.
