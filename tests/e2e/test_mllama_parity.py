"""Llama 3.2 Vision parity: the three services against MllamaForConditionalGeneration run whole.

Images enter through cross-attention layers: the encoder returns each image's cross-attention states
(ItemEmbeddings.cross_attention_states), the LLM projects them to the cross-attention layers' keys and
values at prefill and keeps them for decode. Single image (two sizes: 4 and 3 real tiles), two images
(their tokens adjacent, so the processor's rule that consecutive images all see to the end is
exercised), text-only; then the same contract driven by a router of its own (Preprocess, Encode,
Generate called directly), and the LLM's refusals of the wrong kind of input.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.client import build_messages
from services.common import chunks
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_proto, to_proto
from tests.checkpoints import tiny_checkpoint
from tests.parity import CASES, MAX_NEW_TOKENS, family_services, model_info_test, parity_tests
from tests.reference import hf_generate

services = family_services("mllama")
test_parity = parity_tests("mllama")
test_model_info = model_info_test("mllama")

# The tiny model (services/tiny_checkpoints/mllama.py): 4 tiles of 16 patches + CLS, hidden 64.
TILES, PATCHES, HIDDEN = 4, 17, 64


def _routed(services, case: str) -> tuple[llm_pb2.GenerateRequest, list]:
    """What a router of its own does: Preprocess, Encode, then the LLM request with the encoder's states."""
    prompt, images = CASES[case]
    with grpc.insecure_channel(services.address) as channel:
        prepared = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(processor_pb2.PreprocessRequest(
            messages=build_messages(prompt, images),
            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=60)
    with grpc.insecure_channel(services.encoder.address) as channel:
        encoded = encoder_pb2_grpc.EncoderServiceStub(channel).Encode(prepared.encode_request, timeout=60)
    by_hash = {item.mm_hash: item for item in encoded.items}
    request = prepared.llm_request
    for mm in request.prompt.multimodal_inputs:
        mm.cross_attention_states.CopyFrom(by_hash[mm.placeholder.mm_hash].cross_attention_states)
    return request, list(encoded.items)


def _llm_generate(services, request: llm_pb2.GenerateRequest) -> llm_pb2.GenerateResponse:
    with grpc.insecure_channel(services.llm.address) as channel:
        return llm_pb2_grpc.LlmServiceStub(channel).Generate(request, timeout=60)


@pytest.mark.e2e
def test_a_router_of_its_own_gets_the_same_tokens(services):
    """The contract as a disaggregated router uses it: one state tensor per image, all tiles, no rows."""
    request, items = _routed(services, "two-images")
    assert [tuple(item.cross_attention_states.shape) for item in items] == [(TILES * PATCHES, HIDDEN)] * 2
    assert not any(item.HasField("embeddings") for item in items)
    assert [mm.placeholder.length for mm in request.prompt.multimodal_inputs] == [1, 1]  # one <|image|> each
    expected = hf_generate(tiny_checkpoint("mllama"), *CASES["two-images"], MAX_NEW_TOKENS)
    assert list(_llm_generate(services, request).token_ids) == expected


@pytest.mark.e2e
@pytest.mark.parametrize("wrong", ["embeddings-instead", "both", "one-tile-short", "padding-tiles-dropped"])
def test_the_wrong_kind_of_input_is_refused(services, wrong):
    request, _ = _routed(services, "one-image")
    mm = request.prompt.multimodal_inputs[0]
    states = from_proto(mm.cross_attention_states)
    if wrong == "embeddings-instead":  # what a LLaVA-style router would send: one row for the one token
        mm.ClearField("cross_attention_states")
        mm.embeddings.CopyFrom(to_proto(torch.zeros(1, HIDDEN)))
    elif wrong == "both":
        mm.embeddings.CopyFrom(to_proto(torch.zeros(1, HIDDEN)))
    elif wrong == "one-tile-short":
        mm.cross_attention_states.CopyFrom(to_proto(states[: (TILES - 1) * PATCHES + 5]))
    else:  # the real tiles only: not exact (text before the image attends to the padding tiles too)
        mm.cross_attention_states.CopyFrom(to_proto(states[: 3 * PATCHES]))
    with pytest.raises(grpc.RpcError) as caught:
        _llm_generate(services, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "CROSS_ATTENTION_STATES_INVALID", caught.value.details()


@pytest.mark.e2e
def test_states_cross_in_chunks_both_ways(services):
    """Llama-3.2-11B's states are 50 MiB an image: they must take the chunked paths as embeddings do.
    Here 4 KiB chunks (the tiny image's states are 17 KiB): StreamEncode's reply, reassembled, equals
    Encode's; ChunkedStreamGenerate with them gives transformers' tokens."""
    request, items = _routed(services, "two-images")

    async def stream_encode() -> encoder_pb2.EncodeResponse:
        async with grpc.aio.insecure_channel(services.encoder.address) as channel:
            with grpc.insecure_channel(services.address) as sync_channel:
                prepared = processor_pb2_grpc.ProcessorServiceStub(sync_channel).Preprocess(
                    processor_pb2.PreprocessRequest(messages=build_messages(*CASES["two-images"])), timeout=60)
            return await chunks.call_encode(encoder_pb2_grpc.EncoderServiceStub(channel), prepared.encode_request, 60, None,
                                            max_chunk_bytes=chunks.MIN_CHUNK_BYTES)

    streamed = asyncio.run(stream_encode())
    assert [from_proto(i.cross_attention_states).tolist() for i in streamed.items] == [
        from_proto(i.cross_attention_states).tolist() for i in items]
    stream_request = llm_pb2.StreamGenerateRequest(model_fingerprint=request.model_fingerprint, prompt=request.prompt,
                                                   sampling=request.sampling)
    messages = chunks.split_generate_request(stream_request, chunks.MIN_CHUNK_BYTES)
    assert len(messages) > 8  # two 17 KiB tensors in 4 KiB chunks
    with grpc.insecure_channel(services.llm.address) as channel:
        replies = list(llm_pb2_grpc.LlmServiceStub(channel).ChunkedStreamGenerate(iter(messages), timeout=60))
    tokens = [t for reply in replies for t in reply.response.token_ids]
    assert tokens == hf_generate(tiny_checkpoint("mllama"), *CASES["two-images"], MAX_NEW_TOKENS)
