"""Faults, each service a process: kill -9 an encoder replica, every encoder, the LLM service, the LLM's
engine process or the processor while requests are in flight.

Every client ends within its deadline, never hangs: with a clean, correct answer or UNAVAILABLE (and a
reason naming what failed). The killed process, started again on its port, is taken back without
restarting the others (the processor reconnects by itself) and answers as transformers does. With two
encoder replicas, killing one loses no request. Recovery times are printed (docs/reliability/faults.md).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.processor.ring import HashRing
from tests.media import image_bytes
from tests.procs import Proc, engine_pid
from tests.reference import hf_generate
from tests.reliability.cluster import Cluster, Stream, generate, recover, request, start_stream

pytestmark = pytest.mark.e2e

TIMEOUT_S = 60  # each client's deadline: every fault below must end its calls well before it
LONG_TOKENS = 800  # a stream still decoding when the fault strikes (~2 s with a few others)
NUM_STREAMS = 4
LONG_PROMPT = "Tell a long story."


@pytest.fixture(scope="module")
def cluster(qwen2_vl_dir):
    cluster = Cluster.start(qwen2_vl_dir, 2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def long_answer(qwen2_vl_dir) -> list[int]:
    answer = hf_generate(qwen2_vl_dir, LONG_PROMPT, [], LONG_TOKENS)
    assert len(answer) == LONG_TOKENS  # no early EOS: the streams run their whole length
    return answer


def _wait_for_line(proc: Proc, text: str, times: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(text in line for line in proc.lines) < times:
        assert time.monotonic() < deadline, f"{proc.name} never logged {text!r}:\n{proc.output()}"
        time.sleep(0.05)


def _streams_in_flight(address: str, n: int = NUM_STREAMS) -> list[Stream]:
    streams = [start_stream(address, request(LONG_PROMPT, [], LONG_TOKENS), TIMEOUT_S) for _ in range(n)]
    for stream in streams:
        assert stream.first_token.wait(TIMEOUT_S) and stream.error is None, stream.error
    return streams


def _ended_unavailable(streams: list[Stream], killed_at: float) -> float:
    """Every stream ended UNAVAILABLE (none hung to its deadline); the seconds until the last one ended."""
    for stream in streams:
        assert stream.done.wait(TIMEOUT_S + 5), "a stream hung past its deadline"
        assert stream.code == grpc.StatusCode.UNAVAILABLE, (stream.code, stream.error and stream.error.details())
    return max(s.ended_at for s in streams) - killed_at


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- encoders ---------------------------------------------------------------------------------------
PROMPT = "Describe the picture."
MAX_NEW_TOKENS = 6
IMAGES = [image_bytes(64 + 16 * i, 64 + 8 * (i % 3), seed=300 + i) for i in range(5)]
STREAM = [0, 1, 2, 0, 3, 1, 4, 0, 2, 3, 4, 1, 2, 0, 3, 4, 1, 2]  # each image several times, interleaved
KILL_AFTER = 6  # completed requests before encoder 0 is killed
CONCURRENCY = 4


def _generate(stub, image: bytes) -> list[int]:
    reply = stub.Generate(processor_pb2.GenerateRequest(
        messages=build_messages(PROMPT, [image]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=TIMEOUT_S)
    return list(reply.completion.token_ids)


def _mm_hash(stub, image: bytes) -> str:
    pre = stub.Preprocess(processor_pb2.PreprocessRequest(messages=build_messages(PROMPT, [image])), timeout=60)
    return pre.encode_request.items[0].mm_hash


def _encodes(proc: Proc) -> int:
    """Encode calls the encoder answered OK, from its log (one line per call)."""
    return sum("EncoderService/Encode OK" in line or "EncoderService/StreamEncode OK" in line for line in proc.lines)


def test_an_encoder_replica_killed_mid_stream_fails_no_request_and_comes_back(cluster, qwen2_vl_dir):
    """(Moved here from tests/e2e/test_encoder_pool.py.)"""
    a, b = (e.address for e in cluster.encoders)
    expected = {i: hf_generate(qwen2_vl_dir, PROMPT, [IMAGES[i]], MAX_NEW_TOKENS) for i in set(STREAM)}
    assert len({tuple(t) for t in expected.values()}) > 1  # the image changes the answer: parity has power

    with grpc.insecure_channel(cluster.processor.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        answers: dict[int, list[int]] = {}
        failures: list[str] = []
        with ThreadPoolExecutor(CONCURRENCY) as workers:
            futures = {workers.submit(_generate, stub, IMAGES[image]): n for n, image in enumerate(STREAM)}
            for done, future in enumerate(as_completed(futures), start=1):
                try:
                    answers[futures[future]] = future.result()
                except grpc.RpcError as err:
                    failures.append(f"request {futures[future]}: {err.code().name} {err.details()}")
                if done == KILL_AFTER:
                    cluster.encoders[0].stop(signal.SIGKILL)  # mid-stream: the others are queued or in flight
        assert failures == []
        assert {n: answers[n] for n in range(len(STREAM))} == {n: expected[i] for n, i in enumerate(STREAM)}
        assert cluster.encoders[0].popen.returncode == -signal.SIGKILL
        _wait_for_line(cluster.processor, f"encoder {a} ejected")
        assert _encodes(cluster.encoders[1]) > 0

        # Back on the same port: the pool admits it again, and images whose hash it owns go to it.
        started = time.monotonic()
        restarted = cluster.restart_encoder(0)
        _wait_for_line(cluster.processor, f"encoder {a} admitted", times=2)  # at start, and now
        print(f"encoder replica: restarted and admitted again in {time.monotonic() - started:.1f} s")
        ring = HashRing([a, b])
        candidates = (image_bytes(72, 72, seed=400 + i) for i in range(40))
        owned_by_a = [img for img in candidates if next(ring.walk(_mm_hash(stub, img))) == a][:2]
        assert len(owned_by_a) == 2
        for image in owned_by_a:
            assert _generate(stub, image) == hf_generate(qwen2_vl_dir, PROMPT, [image], MAX_NEW_TOKENS)
        assert _encodes(restarted) == 2, restarted.output()


def test_every_encoder_killed_is_unavailable_then_restarted_ones_answer(cluster, qwen2_vl_dir):
    images = [image_bytes(80, 64 + 8 * i, seed=500 + i) for i in range(6)]
    # Requests arriving as the encoders die: those already decoding finish (correct), the others fail fast.
    with ThreadPoolExecutor(len(images)) as workers:
        futures = [workers.submit(generate, cluster.processor.address, request(PROMPT, [img], 200), TIMEOUT_S)
                   for img in images]
        time.sleep(0.05)
        killed_at = time.monotonic()
        for encoder in cluster.encoders:
            encoder.stop(signal.SIGKILL)
        for future in futures:
            future.exception(TIMEOUT_S + 5)  # ended, one way or the other, within its deadline
        ended_s = time.monotonic() - killed_at
    outcomes = []
    for image, future in zip(images, futures, strict=True):
        err = future.exception()
        if err is None:
            outcomes.append(future.result() == hf_generate(qwen2_vl_dir, PROMPT, [image], 200))
        else:
            assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.UNAVAILABLE, err
            assert error_info(err).reason == "ENCODER_UNAVAILABLE", err.details()
            outcomes.append("UNAVAILABLE")
    assert all(o is True or o == "UNAVAILABLE" for o in outcomes), outcomes
    # A new image request: refused at once, naming the encoders; a text one is still answered.
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        generate(cluster.processor.address, request(PROMPT, [images[0]], 4), TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "ENCODER_UNAVAILABLE" and "encoder" in caught.value.details()
    refused_s = time.monotonic() - started
    assert refused_s < 5
    assert len(generate(cluster.processor.address, request("hi", [], 4))) == 4

    started = time.monotonic()
    with ThreadPoolExecutor(2) as workers:  # both start-ups at once
        list(workers.map(cluster.restart_encoder, range(2)))
    answer, waited_s = recover(cluster.processor.address, request(PROMPT, [images[1]], MAX_NEW_TOKENS))
    assert answer == hf_generate(qwen2_vl_dir, PROMPT, [images[1]], MAX_NEW_TOKENS)
    print(f"all encoders: outcomes {outcomes}, all ended {ended_s:.1f} s after the kill, new request refused in "
          f"{refused_s * 1000:.0f} ms; answered {waited_s:.1f} s after the restarted encoders were SERVING "
          f"({time.monotonic() - started:.1f} s with their start-up)")


# ---- the LLM --------------------------------------------------------------------------------------
def test_llm_killed_mid_stream_is_unavailable_then_the_restarted_one_answers(cluster, long_answer):
    engine = engine_pid(cluster.llm.popen.pid)
    processor_pid = cluster.processor.popen.pid
    streams = _streams_in_flight(cluster.processor.address)
    killed_at = time.monotonic()
    cluster.llm.stop(signal.SIGKILL)
    ended_s = _ended_unavailable(streams, killed_at)
    assert all(error_info(s.error).reason == "LLM_UNAVAILABLE" for s in streams), [s.error.details() for s in streams]
    deadline = time.monotonic() + 30
    while _alive(engine):  # the engine sees its pipe close and exits: no orphan holding the memory
        assert time.monotonic() < deadline, "the engine process outlived its killed service"
        time.sleep(0.1)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        generate(cluster.processor.address, request("hi", [], 4), TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "LLM_UNAVAILABLE"
    refused_s = time.monotonic() - started
    assert refused_s < 5

    cluster.restart_llm()
    answer, waited_s = recover(cluster.processor.address, request(LONG_PROMPT, [], 16))
    assert answer == long_answer[:16] and waited_s < 5
    assert cluster.processor.popen.pid == processor_pid and cluster.processor.popen.poll() is None
    print(f"llm: {NUM_STREAMS} streams UNAVAILABLE within {ended_s:.2f} s of the kill, a new request refused in "
          f"{refused_s * 1000:.0f} ms; answered {waited_s:.2f} s after the restarted LLM was SERVING")


def test_engine_killed_mid_stream_is_unavailable_then_the_service_restarts_it(cluster, long_answer):
    """(Moved here from tests/e2e/test_llm_load.py, now through the processor.) SIGKILL the engine
    process: streams end UNAVAILABLE LLM_ENGINE_CRASHED with a retry hint, the LLM's health says
    NOT_SERVING until a new engine has loaded the model, then requests succeed; nothing else restarts."""
    service_pid, engine = cluster.llm.popen.pid, engine_pid(cluster.llm.popen.pid)
    streams = _streams_in_flight(cluster.processor.address)
    killed_at = time.monotonic()
    os.kill(engine, signal.SIGKILL)
    ended_s = _ended_unavailable(streams, killed_at)
    for stream in streams:
        assert error_info(stream.error).reason == "LLM_ENGINE_CRASHED", stream.error.details()
        assert "was killed by SIGKILL" in stream.error.details()
    with grpc.insecure_channel(cluster.llm.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        statuses = set()
        while True:
            statuses.add(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
            if health_pb2.HealthCheckResponse.SERVING in statuses and len(statuses) > 1:
                break
            assert time.monotonic() - killed_at < 120, f"health never came back to SERVING: {statuses}"
            time.sleep(0.05)
        assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    serving_s = time.monotonic() - killed_at
    answer, waited_s = recover(cluster.processor.address, request(LONG_PROMPT, [], 16))
    assert answer == long_answer[:16]
    assert cluster.llm.popen.pid == service_pid and engine_pid(service_pid) != engine
    print(f"engine: {NUM_STREAMS} streams UNAVAILABLE within {ended_s:.2f} s of the kill; LLM SERVING again "
          f"{serving_s:.1f} s after it, answered {waited_s:.2f} s later")


# ---- the processor --------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _wait_idle(pid: int, timeout_s: float = 30) -> float:
    """Until the process burns under 10 % of a core over half a second; the seconds it took."""
    started = time.monotonic()
    while True:
        before = _cpu_s(pid)
        time.sleep(0.5)
        if _cpu_s(pid) - before < 0.05:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, "the engine still decodes the killed processor's streams"


def test_processor_killed_mid_stream_is_unavailable_then_the_restarted_one_answers(cluster, long_answer):
    others = [p.popen.pid for p in (*cluster.encoders, cluster.llm)]
    address = cluster.processor.address
    streams = _streams_in_flight(address)
    killed_at = time.monotonic()
    cluster.processor.stop(signal.SIGKILL)
    ended_s = _ended_unavailable(streams, killed_at)
    # The LLM saw its caller go: it stops decoding the orphaned streams (each had ~800 tokens to go).
    idle_s = _wait_idle(engine_pid(cluster.llm.popen.pid))

    started = time.monotonic()
    cluster.restart_processor()
    answer, waited_s = recover(address, request(LONG_PROMPT, [], 16))
    assert answer == long_answer[:16] and waited_s < 5
    assert [p.popen.pid for p in (*cluster.encoders, cluster.llm)] == others
    print(f"processor: {NUM_STREAMS} streams UNAVAILABLE within {ended_s:.2f} s of the kill, the engine idle "
          f"{idle_s:.1f} s later; restarted and answering in {time.monotonic() - started:.1f} s")
