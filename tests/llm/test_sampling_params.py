"""The LLM service's sampling parameters over gRPC (in process, port 0): every out-of-range value is
INVALID_ARGUMENT naming its field, and logprobs come back per token when asked for."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig, ServerConfig
from services.common.errors import error_info
from services.llm.server import start_server
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint

PROMPT = llm_pb2.Prompt(token_ids=[10, 11, 12, 13])
Params = generation_pb2.SamplingParams


@pytest.fixture(scope="module")
def servicer(qwen2_vl_dir):
    servicer = LlmServicer(Checkpoint(qwen2_vl_dir), LlmConfig(model=qwen2_vl_dir))
    yield servicer
    servicer.engine.stop()


def _run(servicer, body):
    async def main():
        server, _ = await start_server(servicer, ServerConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                return await body(llm_pb2_grpc.LlmServiceStub(channel))
        finally:
            await server.stop(0)

    return asyncio.run(main())


INVALID = {
    "min_p": [Params(min_p=-0.1), Params(min_p=1.5), Params(min_p=float("nan"))],
    "presence_penalty": [Params(presence_penalty=2.5), Params(presence_penalty=-2.01),
                         Params(presence_penalty=float("inf"))],
    "frequency_penalty": [Params(frequency_penalty=-3.0), Params(frequency_penalty=2.1)],
    "top_logprobs": [Params(logprobs=True, top_logprobs=21), Params(logprobs=True, top_logprobs=-1),
                     Params(top_logprobs=3)],  # top alternatives without logprobs
    "temperature": [Params(temperature=-1.0), Params(temperature=101.0)],
    "top_p": [Params(top_p=1.5)],
    "top_k": [Params(top_k=-2)],
    "repetition_penalty": [Params(repetition_penalty=0.0), Params(repetition_penalty=11.0)],
    "max_new_tokens": [Params(max_new_tokens=-1)],
    "stop_token_ids": [Params(stop_token_ids=[-5])],
}


@pytest.mark.parametrize("field,params", [(f, p) for f, ps in INVALID.items() for p in ps],
                         ids=lambda x: x if isinstance(x, str) else str(x).replace("\n", " ").strip())
def test_out_of_range_value_is_invalid_argument_naming_the_field(servicer, field, params):
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, sampling=params))
        return caught.value

    err = _run(servicer, body)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err)
    assert info.reason == "SAMPLING_PARAM_INVALID"
    assert info.metadata["field"] == f"sampling.{field}"
    assert f"sampling.{field}" in err.details()


def test_values_at_the_bounds_are_accepted(servicer):
    params = Params(max_new_tokens=2, temperature=1.0, min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0,
                    logprobs=True, top_logprobs=20, seed=3)

    async def body(stub):
        return await stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, sampling=params))

    reply = _run(servicer, body)
    assert len(reply.token_ids) == 2 and len(reply.logprobs) == 2
    assert all(len(step.top_logprobs) == 20 for step in reply.logprobs)


def test_logprobs_per_token_in_unary_and_stream_replies(servicer):
    params = Params(max_new_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=4)

    async def body(stub):
        unary = await stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, sampling=params))
        stream = [m async for m in stub.StreamGenerate(llm_pb2.StreamGenerateRequest(prompt=PROMPT, sampling=params))]
        plain = await stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, sampling=Params(max_new_tokens=6,
                                                                                           ignore_eos=True)))
        return unary, stream, plain

    unary, stream, plain = _run(servicer, body)
    assert list(plain.token_ids) == list(unary.token_ids) and not plain.logprobs  # only when asked for
    assert [step.token.token_id for step in unary.logprobs] == list(unary.token_ids)
    for step in unary.logprobs:
        top = [(t.token_id, t.logprob) for t in step.top_logprobs]
        assert len(top) == 4 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
        assert (step.token.token_id, step.token.logprob) == top[0]  # greedy: the most likely token
        assert torch.tensor([lp for _, lp in top]).exp().sum() <= 1.0 + 1e-5
    streamed = [step for m in stream[:-1] for step in m.logprobs]
    assert [len(m.logprobs) for m in stream[:-1]] == [1] * len(unary.token_ids)
    assert not stream[-1].logprobs and stream[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert streamed == list(unary.logprobs)


def test_seed_gives_the_same_tokens_again_with_every_setting(servicer):
    params = Params(max_new_tokens=12, ignore_eos=True, temperature=1.2, top_k=50, top_p=0.95, min_p=0.02,
                    presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, seed=2024)

    async def body(stub):
        first, second = await asyncio.gather(*(stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, sampling=params))
                                               for _ in range(2)))
        params.seed = 2025
        other = await stub.Generate(llm_pb2.GenerateRequest(prompt=PROMPT, sampling=params))
        return first, second, other

    first, second, other = _run(servicer, body)
    assert list(first.token_ids) == list(second.token_ids)
    assert list(first.token_ids) != list(other.token_ids)
