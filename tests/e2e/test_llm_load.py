"""The LLM service as its own process, under load: cancelled and timed-out streams leave its engine.

Seen from outside, as an operator would: after 50 streams are cancelled mid-way the engine process
goes idle (it no longer decodes them), a fresh request is served, and its resident memory does not
grow round after round (each round's caches, ~1 MiB per request here, are freed).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from tests.procs import engine_pid, start_llm, wait_listening, wait_serving

pytestmark = pytest.mark.e2e

NUM_STREAMS = 50
PROMPT = [10 + i % 490 for i in range(2000)]  # 2000 text tokens: ~1 MiB of KV cache per request here
LONG = generation_pb2.SamplingParams(max_new_tokens=5000, ignore_eos=True)
# Kept caches would add ~50 MiB per round: 150 MiB or more from the fourth round to each of the last
# two. The engine returns its free heap to the OS when it goes idle (core.release_free_memory), so an
# idle engine's RSS is what it holds: here [774, 821, 811, 829, 774, 780, 793, 775]. Without that its
# RSS kept the allocator's high-water mark of the round's busiest moment and swung by up to 400 MiB
# between identical rounds ([890, 936, 1028, 887, 887, 887, 1031, 1051] here, a steady-looking climb
# 1143 -> 1314 on the CI machine). Growth is measured from the highest of the first four rounds to the
# smaller of the last two: a leak grows every round, so it passes that mark by 150 MiB.
WARMUP_ROUNDS = 4
MAX_RSS_GROWTH_MIB = 64


@pytest.fixture(scope="module")
def llm(qwen2_vl_dir):
    proc = start_llm(qwen2_vl_dir, "--max-running-requests", "64", "--max-waiting-requests", "8")
    wait_serving(wait_listening(proc))
    yield proc
    assert proc.stop() == 0, proc.output()


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_idle(pid: int, timeout_s: float = 60) -> None:
    """Until the engine burns under 10 % of a core over half a second: it decodes nothing."""
    deadline = time.monotonic() + timeout_s
    while True:
        before = _cpu_s(pid)
        time.sleep(0.5)
        if _cpu_s(pid) - before < 0.05:
            return
        assert time.monotonic() < deadline, "the engine is still decoding after its streams were cancelled"


async def _round(address: str, *, deadline_s: float | None = None) -> None:
    """NUM_STREAMS streams, each read until its first token (admitted, prefilled, decoding), then
    cancelled by the client; or (deadline_s) read until their deadline ends them (on a loaded
    machine some may end before their first token)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        request = llm_pb2.StreamGenerateRequest(prompt=llm_pb2.Prompt(token_ids=PROMPT), sampling=LONG)
        calls = [stub.StreamGenerate(request, timeout=deadline_s) for _ in range(NUM_STREAMS)]
        if deadline_s is None:
            for call in calls:
                await call.read()
            for call in calls:
                call.cancel()
            return
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while await call.read() is not grpc.aio.EOF:
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _fresh_request_succeeds(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        reply = llm_pb2_grpc.LlmServiceStub(channel).Generate(llm_pb2.GenerateRequest(
            prompt=llm_pb2.Prompt(token_ids=PROMPT[:8]),
            sampling=generation_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True)), timeout=60)
    assert len(reply.token_ids) == 3


def test_cancelled_streams_free_the_engine_and_memory_stays_flat(llm):
    engine = engine_pid(llm.popen.pid)
    rss_mib = []
    for round_kind in ("cancel",) * 7 + ("deadline",):
        asyncio.run(_round(llm.address, deadline_s=10.0 if round_kind == "deadline" else None))
        _wait_idle(engine)
        _fresh_request_succeeds(llm.address)
        rss_mib.append(_rss_mib(engine))
    print(f"engine RSS per round (MiB): {[round(mib) for mib in rss_mib]}")
    assert engine_pid(llm.popen.pid) == engine  # the same engine all along: nothing crashed
    growth = min(rss_mib[-2:]) - max(rss_mib[:WARMUP_ROUNDS])
    assert growth < MAX_RSS_GROWTH_MIB, f"engine RSS per round (MiB): {rss_mib}"
