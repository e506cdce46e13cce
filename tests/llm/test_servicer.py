"""The LLM service in process (port 0): admission limits, cancellation freeing the work, and what it
refuses before using it (non-finite embeddings, stop strings, position inputs the range contradicts)."""

from __future__ import annotations

import asyncio
import os
import threading

import grpc
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.api.triptych.common.v1 import generation_pb2, tensor_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig, ServerConfig
from services.common.errors import error_info
from services.common.tensors import to_named, to_proto
from services.llm.server import start_server
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint

LONG = generation_pb2.SamplingParams(max_new_tokens=3000, ignore_eos=True)


@pytest.fixture(scope="module")
def servicer(qwen2_vl_dir):
    cfg = LlmConfig(model=qwen2_vl_dir, max_running_requests=1, max_waiting_requests=0)
    servicer = LlmServicer(Checkpoint(qwen2_vl_dir), cfg)
    yield servicer
    servicer.stop()


async def _with_server(servicer, body):
    server, _ = await start_server(servicer, ServerConfig(port=0))
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            await body(llm_pb2_grpc.LlmServiceStub(channel))
    finally:
        await server.stop(0)


def _request(sampling=LONG) -> llm_pb2.StreamGenerateRequest:
    return llm_pb2.StreamGenerateRequest(prompt=llm_pb2.Prompt(token_ids=[10, 11, 12, 13]), sampling=sampling)


def _retry_delay_s(err: grpc.aio.AioRpcError) -> float | None:
    for detail in rpc_status.from_call(err).details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.ToTimedelta().total_seconds()
    return None


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
        assert _retry_delay_s(caught.value) == 1.0  # a retry hint, not a bare refusal
        running.cancel()
        await _until(lambda: servicer.engine.num_in_flight == 0)  # cancelled requests leave the engine
        short = await stub.Generate(llm_pb2.GenerateRequest(
            prompt=_request().prompt, sampling=generation_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True)))
        assert len(short.token_ids) == 3 and short.finish_reason == generation_pb2.FINISH_REASON_LENGTH

    asyncio.run(_with_server(servicer, body))


def test_the_service_process_holds_no_model(servicer):
    """The model and torch steps live in the engine process; the servicer knows the vocabulary from it."""
    assert servicer.engine.pid not in (None, os.getpid())
    assert not any(isinstance(value, torch.nn.Module) for value in vars(servicer).values())
    assert servicer.vocab_size == 1024  # the tiny checkpoint's embedding rows, from the engine's hello


def test_out_of_vocabulary_token_is_invalid_argument(servicer):
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(llm_pb2.GenerateRequest(prompt=llm_pb2.Prompt(token_ids=[1, 10**9])))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "10000" in caught.value.details() or "vocabulary" in caught.value.details()

    asyncio.run(_with_server(servicer, body))


# ---- what the LLM refuses before using it --------------------------------------------------------
def _image_prompt(servicer, embeddings: torch.Tensor, grid=((1, 4, 4),), deepstack=()) -> llm_pb2.Prompt:
    """Two text tokens, four image placeholders (a 4x4 patch grid merged 2x2), one text token."""
    image = servicer.placeholder_ids["image"]
    mm = llm_pb2.MultimodalInput(
        placeholder=tensor_pb2.PlaceholderRange(modality=tensor_pb2.MODALITY_IMAGE, offset=2, length=4),
        embeddings=to_proto(embeddings), deepstack_embeddings=[to_proto(d) for d in deepstack],
        position_inputs=to_named({"image_grid_thw": torch.tensor(grid)}))
    return llm_pb2.Prompt(token_ids=[10, 11, image, image, image, image, 12], multimodal_inputs=[mm])


def _rows(servicer, fill: float = 0.0) -> torch.Tensor:
    return torch.full((4, servicer.family.hidden_size), fill)


def _generate_error(servicer, request) -> grpc.aio.AioRpcError:
    async def body(stub):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if isinstance(request, llm_pb2.StreamGenerateRequest):
                async for _ in stub.StreamGenerate(request):
                    pass
            else:
                await stub.Generate(request)
        errors.append(caught.value)
        # still serving, image included
        ok = llm_pb2.GenerateRequest(prompt=_image_prompt(servicer, _rows(servicer)), sampling=SHORT)
        assert len((await stub.Generate(ok)).token_ids) == 2

    errors: list[grpc.aio.AioRpcError] = []
    asyncio.run(_with_server(servicer, body))
    return errors[0]


SHORT = generation_pb2.SamplingParams(max_new_tokens=2, ignore_eos=True)


# Non-finite deepstack rows: tests/llm/test_precomputed.py (Qwen3-VL; this Qwen2-VL refuses any deepstack).
@pytest.mark.parametrize(("bad", "where"), [
    (float("nan"), "multimodal_inputs[0].embeddings"),
    (float("inf"), "multimodal_inputs[0].embeddings"),
], ids=["nan", "inf"])
def test_non_finite_embeddings_are_invalid_argument(servicer, bad, where):
    rows = _rows(servicer)
    poisoned = rows.clone()
    poisoned[1, 3] = bad
    if "deepstack" in where:
        prompt = _image_prompt(servicer, rows, deepstack=[poisoned])
    else:
        prompt = _image_prompt(servicer, poisoned)
    err = _generate_error(servicer, llm_pb2.GenerateRequest(prompt=prompt, sampling=SHORT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err)
    assert info.reason == "EMBEDDING_NOT_FINITE" and info.metadata["input"] == where
    assert err.details().startswith(f"{where} holds NaN or Inf (first at row 1, column 3)")


@pytest.mark.parametrize("stream", [False, True], ids=["Generate", "StreamGenerate"])
def test_stop_strings_are_refused_not_ignored(servicer, stream):
    sampling = generation_pb2.SamplingParams(max_new_tokens=2, stop=["\n"])
    prompt = llm_pb2.Prompt(token_ids=[10, 11, 12])
    request = (llm_pb2.StreamGenerateRequest if stream else llm_pb2.GenerateRequest)(prompt=prompt, sampling=sampling)
    err = _generate_error(servicer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "STOP_STRINGS_UNSUPPORTED"
    assert "stop_token_ids" in err.details()


@pytest.mark.parametrize(("grid", "message"), [
    (((1, 10000, 10000),), "image_grid_thw mean 25000000 tokens, the placeholder range has 4"),
    (((1, 2, 8),), None),  # 4 tokens too, but not the processor's [1, 4, 4]: positions differ, still valid
    (((1, 4, 4), (1, 4, 4)), "image_grid_thw dim 0 is 2, expected 1"),
    (((0, 4, 4),), "image_grid_thw value t is 0, expected at least 1"),
], ids=["claimed-grid", "other-valid-grid", "two-grids", "zero"])
def test_position_inputs_are_checked_against_the_range(servicer, grid, message):
    request = llm_pb2.GenerateRequest(prompt=_image_prompt(servicer, _rows(servicer), grid=grid), sampling=SHORT)
    if message is None:
        async def body(stub):
            assert len((await stub.Generate(request)).token_ids) == 2

        asyncio.run(_with_server(servicer, body))
        return
    err = _generate_error(servicer, request)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "POSITION_INPUT_INVALID"
    assert err.details() == f"multimodal_inputs[0].position_inputs: {message}"


def test_requests_are_parsed_off_the_event_loop(servicer, monkeypatch):
    names: list[str] = []
    parse = servicer._parse_multimodal

    def recording(*args):
        names.append(threading.current_thread().name)
        return parse(*args)

    monkeypatch.setattr(servicer, "_parse_multimodal", recording)

    async def body(stub):
        await stub.Generate(llm_pb2.GenerateRequest(prompt=_image_prompt(servicer, _rows(servicer)), sampling=SHORT))

    asyncio.run(_with_server(servicer, body))
    assert names and all(name.startswith("llm-parse") for name in names), names
