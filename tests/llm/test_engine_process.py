"""The engine in its own process, through its client: the same tokens as the engine in a thread,
admission (RESOURCE_EXHAUSTED with a retry hint), cancelled requests leaving the engine, a crash
failing its requests with UNAVAILABLE and a restart serving again, and stop leaving nothing behind.

One engine process per module (spawn + model load); the crash/stop test starts its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import grpc
import pytest
import torch
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import TriptychError
from services.llm.engine import Engine, Finished
from services.llm.engine_client import EngineClient
from services.llm.engine_process import EngineSpec
from services.llm.sampling import SamplingSpec
from services.models.base import ItemEmbeddings, PlacedEmbeddings
from services.models.checkpoint import Checkpoint

MAX_RUNNING, MAX_WAITING = 8, 56  # room for the 50 cancelled streams below
LONG = SamplingSpec(max_new_tokens=3000)


def _spec(model, max_running=MAX_RUNNING, max_waiting=MAX_WAITING) -> EngineSpec:
    return EngineSpec(model=model, dtype="float32", device="cpu", max_running=max_running,
                      max_waiting=max_waiting, max_batch_tokens=512, torch_threads=1)


@pytest.fixture(scope="module")
def client(qwen2_vl_dir):
    client = EngineClient(_spec(qwen2_vl_dir))
    client.start()
    yield client
    client.stop()


def _image_request(qwen2_vl_dir) -> tuple[torch.Tensor, list[PlacedEmbeddings]]:
    """Text, a 4-token image (2x2 merged patches of a 4x4 grid) with random embeddings, text."""
    family = Checkpoint(qwen2_vl_dir).family
    image = family.config.image_token_id
    token_ids = torch.tensor([10, 11, image, image, image, image, 12, 13])
    rows = torch.randn(4, family.hidden_size, generator=torch.Generator().manual_seed(3))
    placed = [PlacedEmbeddings("image", 2, 4, ItemEmbeddings(rows), {"image_grid_thw": torch.tensor([[1, 4, 4]])})]
    return token_ids, placed


async def _collect(engine, token_ids, placed, sampling) -> list[int]:
    tokens = []
    async for event in engine.generate(token_ids, placed, sampling):
        if not isinstance(event, Finished):
            tokens.append(event.token_id)
    return tokens


async def _cancel(tasks, streams) -> None:
    """Cancels streams mid-way, as a cancelled RPC does: a pending read is cancelled, a suspended stream closed."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        await stream.aclose()


async def _until(predicate, timeout_s=60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


def test_tokens_equal_the_engine_in_a_thread(client, qwen2_vl_dir):
    checkpoint = Checkpoint(qwen2_vl_dir)
    model = checkpoint.family.load_model(qwen2_vl_dir, torch.float32, "cpu")
    checkpoint.family.strip_for_llm(model)
    in_thread = Engine(checkpoint.family, model, max_running=4, max_waiting=4)
    token_ids, placed = _image_request(qwen2_vl_dir)
    cases = [SamplingSpec(max_new_tokens=12), SamplingSpec(max_new_tokens=12, temperature=0.9, top_k=50, seed=7)]
    try:
        for sampling in cases:
            expected = asyncio.run(_collect(in_thread, token_ids, placed, sampling))
            got = asyncio.run(_collect(client, token_ids, placed, sampling))
            assert got == expected and len(got) == 12, sampling
    finally:
        in_thread.stop()
    # The image's embeddings reach the engine: other rows, other tokens.
    other = [PlacedEmbeddings("image", 2, 4, ItemEmbeddings(placed[0].embeddings.embeddings * -3),
                              placed[0].position_inputs)]
    assert asyncio.run(_collect(client, token_ids, other, cases[0])) != expected


def test_full_is_resource_exhausted_with_retry_info_and_cancel_frees_rows(client):
    async def body():
        prompt = torch.tensor([10, 11, 12, 13])
        streams = [client.generate(prompt, [], LONG) for _ in range(MAX_RUNNING + MAX_WAITING)]
        first = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await _until(lambda: client.num_in_flight == MAX_RUNNING + MAX_WAITING)  # admitted without asking the engine
        with pytest.raises(TriptychError) as caught:
            await client.generate(prompt, [], LONG).__anext__()
        err = caught.value
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "LLM_QUEUE_FULL"
        status = status_pb2.Status.FromString(dict(err.to_status("triptych.llm").trailing_metadata)[
            rpc_status.GRPC_DETAILS_METADATA_KEY])
        kinds = {}
        for detail in status.details:
            for cls in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                message = cls()
                if detail.Unpack(message):
                    kinds[cls.__name__] = message
        assert kinds["ErrorInfo"].metadata["maxInFlightRequests"] == str(MAX_RUNNING + MAX_WAITING)
        assert kinds["RetryInfo"].retry_delay.seconds == 1
        await asyncio.wait(first[:MAX_RUNNING], timeout=60)  # the running ones are decoding
        await _cancel(first, streams)
        assert client.num_in_flight == 0

    asyncio.run(body())
    deadline = time.monotonic() + 30
    while client.engine_in_flight() != 0:  # the engine itself dropped every row at its next step
        assert time.monotonic() < deadline, f"{client.engine_in_flight()} requests still in the engine"
        time.sleep(0.05)
    assert asyncio.run(_collect(client, torch.tensor([10, 11]), [], SamplingSpec(max_new_tokens=3))) != []


def test_fifty_cancelled_streams_leave_the_engine(client):
    async def body():
        prompt = torch.tensor([10, 11, 12, 13])
        streams = [client.generate(prompt, [], LONG) for _ in range(50)]
        tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
        done, _ = await asyncio.wait(tasks, timeout=120, return_when=asyncio.FIRST_COMPLETED)
        assert done, "no stream produced a token"
        await _cancel(tasks, streams)
        return client.num_in_flight

    assert asyncio.run(body()) == 0
    deadline = time.monotonic() + 30
    while client.engine_in_flight() != 0:
        assert time.monotonic() < deadline, f"{client.engine_in_flight()} requests still in the engine"
        time.sleep(0.05)


def test_crash_is_unavailable_then_restart_serves_and_stop_leaves_nothing(qwen2_vl_dir):
    before = {t.ident for t in threading.enumerate()}
    client = EngineClient(_spec(qwen2_vl_dir, max_running=2, max_waiting=2))
    client.start()
    first_pid = client.pid
    ready_changes: list[bool] = []
    client.on_ready = ready_changes.append
    prompt = torch.tensor([10, 11, 12, 13])

    async def crash():
        stream = client.generate(prompt, [], LONG)
        await stream.__anext__()
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(TriptychError) as caught:
            async for _ in stream:
                pass
        return caught.value

    err = asyncio.run(crash())
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "LLM_ENGINE_CRASHED"
    assert "was killed by SIGKILL" in err.message and client.num_in_flight == 0

    async def after_restart():  # refused with a retry hint until the new engine has loaded the model
        while True:
            try:
                return await _collect(client, prompt, [], SamplingSpec(max_new_tokens=4))
            except TriptychError as refused:
                assert refused.reason == "LLM_ENGINE_RESTARTING" and refused.code == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.2)

    assert len(asyncio.run(asyncio.wait_for(after_restart(), 120))) == 4
    assert client.restarts == 1 and client.pid != first_pid and ready_changes == [False, True]

    async def stopped_mid_request():
        stream = client.generate(prompt, [], LONG)
        await stream.__anext__()
        stopper = asyncio.get_running_loop().run_in_executor(None, client.stop)
        with pytest.raises(TriptychError) as caught:
            async for _ in stream:
                pass
        await stopper
        return caught.value

    err = asyncio.run(stopped_mid_request())
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "LLM_SHUTTING_DOWN"
    with pytest.raises(ProcessLookupError):
        os.kill(client.pid, 0)  # reaped, not a zombie
    left = [t.name for t in threading.enumerate() if t.ident not in before and not t.name.startswith("asyncio_")]
    assert left == [], left
    with pytest.raises(TriptychError) as caught:
        asyncio.run(_collect(client, prompt, [], SamplingSpec(max_new_tokens=1)))
    assert caught.value.reason == "LLM_SHUTTING_DOWN"


def test_start_failure_names_the_cause(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    client = EngineClient(_spec(tmp_path))
    with pytest.raises(TriptychError) as caught:
        client.start()
    assert caught.value.reason == "LLM_ENGINE_START_FAILED" and str(tmp_path) in caught.value.message
