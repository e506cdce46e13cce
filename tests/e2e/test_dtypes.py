"""Embeddings travel in the model's dtype: bf16 as 2-byte words, checked, never cast."""

from __future__ import annotations

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_proto, to_proto
from tests.media import image_bytes
from tests.procs import start_services

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bf16_services(qwen2_vl_dir):
    services = start_services(qwen2_vl_dir, None, "--dtype", "bfloat16")
    yield services
    services.stop()


def test_bf16_embeddings_travel_as_two_byte_words(bf16_services):
    with (grpc.insecure_channel(bf16_services.processor.address) as p_channel,
          grpc.insecure_channel(bf16_services.encoder.address) as e_channel,
          grpc.insecure_channel(bf16_services.llm.address) as l_channel):
        processor = processor_pb2_grpc.ProcessorServiceStub(p_channel)
        info = processor.GetModelInfo(processor_pb2.GetModelInfoRequest(), timeout=10).model_info
        assert info.embedding_dtype == tensor_pb2.DATA_TYPE_BFLOAT16

        messages = build_messages("Describe.", [image_bytes(96, 96, seed=51)])
        pre = processor.Preprocess(processor_pb2.PreprocessRequest(messages=messages), timeout=60)
        item = encoder_pb2_grpc.EncoderServiceStub(e_channel).Encode(pre.encode_request, timeout=60).items[0]
        rows, hidden = item.embeddings.shape
        assert item.embeddings.dtype == tensor_pb2.DATA_TYPE_BFLOAT16
        assert len(item.embeddings.data) == rows * hidden * 2

        # The LLM takes them as they are, and refuses float32 ones rather than casting.
        llm = llm_pb2_grpc.LlmServiceStub(l_channel)
        request = llm_pb2.GenerateRequest()
        request.CopyFrom(pre.llm_request)
        request.prompt.multimodal_inputs[0].embeddings.CopyFrom(item.embeddings)
        request.sampling.max_new_tokens = 4
        assert len(llm.Generate(request, timeout=60).token_ids) > 0
        request.prompt.multimodal_inputs[0].embeddings.CopyFrom(to_proto(from_proto(item.embeddings).float()))
        with pytest.raises(grpc.RpcError) as caught:
            llm.Generate(request, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "EMBEDDING_DTYPE_MISMATCH"

        reply = processor.Generate(processor_pb2.GenerateRequest(
            messages=messages, sampling=generation_pb2.SamplingParams(max_new_tokens=4)), timeout=60)
        assert reply.completion.completion_tokens > 0
