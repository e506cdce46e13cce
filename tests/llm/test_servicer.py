"""The LLM service in process (port 0): admission limits and cancellation freeing the work."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig, ServerConfig
from services.common.errors import error_info
from services.llm.server import start_server
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint

LONG = generation_pb2.SamplingParams(max_new_tokens=3000, ignore_eos=True)


@pytest.fixture(scope="module")
def servicer(qwen2_vl_dir):
    cfg = LlmConfig(model=qwen2_vl_dir, max_running_requests=1, max_waiting_requests=0)
    servicer = LlmServicer(Checkpoint(qwen2_vl_dir), cfg)
    yield servicer
    servicer.engine.stop()


async def _with_server(servicer, body):
    server, _ = await start_server(servicer, ServerConfig(port=0))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await body(llm_pb2_grpc.LlmServiceStub(channel))
    finally:
        await server.stop(0)


def _request(sampling=LONG) -> llm_pb2.StreamGenerateRequest:
    return llm_pb2.StreamGenerateRequest(prompt=llm_pb2.Prompt(token_ids=[10, 11, 12, 13]), sampling=sampling)


async def _until(predicate, timeout_s=30.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_full_queue_is_resource_exhausted_and_cancel_frees_work(servicer):
    async def body(stub):
        running = stub.StreamGenerate(_request())
        await running.read()  # first token: admitted and decoding
        assert servicer.engine.num_in_flight == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(llm_pb2.GenerateRequest(prompt=_request().prompt, sampling=LONG))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "LLM_QUEUE_FULL"
        running.cancel()
        await _until(lambda: servicer.engine.num_in_flight == 0)  # cancelled requests leave the engine
        short = await stub.Generate(llm_pb2.GenerateRequest(
            prompt=_request().prompt, sampling=generation_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True)))
        assert len(short.token_ids) == 3 and short.finish_reason == generation_pb2.FINISH_REASON_LENGTH

    asyncio.run(_with_server(servicer, body))


def test_out_of_vocabulary_token_is_invalid_argument(servicer):
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(llm_pb2.GenerateRequest(prompt=llm_pb2.Prompt(token_ids=[1, 10**9])))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "10000" in caught.value.details() or "vocabulary" in caught.value.details()

    asyncio.run(_with_server(servicer, body))
