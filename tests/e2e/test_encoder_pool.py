"""Two encoder processes behind one processor: kill -9 one mid-stream, no request fails, every answer
is the whole model's; the killed one comes back on its port and gets traffic again."""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.processor.ring import HashRing
from tests.media import image_bytes
from tests.procs import Proc, spawn, start_encoder, start_llm, start_processor, wait_listening, wait_serving
from tests.reference import hf_generate

pytestmark = pytest.mark.e2e

PROMPT = "Describe the picture."
MAX_NEW_TOKENS = 6
IMAGES = [image_bytes(64 + 16 * i, 64 + 8 * (i % 3), seed=300 + i) for i in range(5)]
# A stream with repeats: each image several times, interleaved.
STREAM = [0, 1, 2, 0, 3, 1, 4, 0, 2, 3, 4, 1, 2, 0, 3, 4, 1, 2]
KILL_AFTER = 6  # completed requests before encoder "a" is killed
CONCURRENCY = 4


def _generate(stub, image: bytes) -> list[int]:
    reply = stub.Generate(processor_pb2.GenerateRequest(
        messages=build_messages(PROMPT, [image]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=300)
    return list(reply.completion.token_ids)


def _mm_hash(stub, image: bytes) -> str:
    pre = stub.Preprocess(processor_pb2.PreprocessRequest(messages=build_messages(PROMPT, [image])), timeout=60)
    return pre.encode_request.items[0].mm_hash


def _wait_for_line(proc: Proc, text: str, times: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(text in line for line in proc.lines) < times:
        assert time.monotonic() < deadline, f"{proc.name} never logged {text!r}:\n{proc.output()}"
        time.sleep(0.1)


def _encodes(proc: Proc) -> int:
    """Encode calls the encoder answered OK, from its log (one line per call)."""
    return sum("EncoderService/Encode OK" in line or "EncoderService/StreamEncode OK" in line for line in proc.lines)


def test_an_encoder_killed_mid_stream_fails_no_request_and_comes_back(qwen2_vl_dir):
    encoder_a, encoder_b, llm = start_encoder(qwen2_vl_dir), start_encoder(qwen2_vl_dir), start_llm(qwen2_vl_dir)
    procs = [encoder_a, encoder_b, llm]
    try:
        a, b, llm_addr = (wait_listening(p) for p in procs)
        processor = start_processor(qwen2_vl_dir, a, llm_addr, None, "--encoder", b)
        procs.append(processor)
        wait_listening(processor)
        for proc in procs:
            wait_serving(proc.address)
        expected = {i: hf_generate(qwen2_vl_dir, PROMPT, [IMAGES[i]], MAX_NEW_TOKENS) for i in set(STREAM)}
        assert len({tuple(t) for t in expected.values()}) > 1  # the image changes the answer: parity has power

        with grpc.insecure_channel(processor.address) as channel:
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
                        encoder_a.stop(signal.SIGKILL)  # mid-stream: the others are queued or in flight
            assert failures == []
            assert {n: answers[n] for n in range(len(STREAM))} == {n: expected[i] for n, i in enumerate(STREAM)}
            assert encoder_a.popen.returncode == -signal.SIGKILL
            _wait_for_line(processor, f"encoder {a} ejected")
            assert _encodes(encoder_b) > 0

            # Back on the same port: the pool admits it again, and images whose hash it owns go to it.
            restarted = start_encoder(qwen2_vl_dir, "--port", a.rsplit(":", 1)[1])
            procs.append(restarted)
            assert wait_listening(restarted) == a
            _wait_for_line(processor, f"encoder {a} admitted", times=2)  # at start, and now
            ring = HashRing([a, b])
            candidates = (image_bytes(72, 72, seed=400 + i) for i in range(40))
            owned_by_a = [img for img in candidates if next(ring.walk(_mm_hash(stub, img))) == a][:2]
            assert len(owned_by_a) == 2
            for image in owned_by_a:
                assert _generate(stub, image) == hf_generate(qwen2_vl_dir, PROMPT, [image], MAX_NEW_TOKENS)
            assert _encodes(restarted) == 2, restarted.output()
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_up_starts_several_encoders_behind_its_processor(qwen2_vl_dir):
    up = spawn("up", "up", "--model", str(qwen2_vl_dir), "--port", "0", "--encoders", "2", listen_name="processor")
    try:
        address = wait_listening(up)
        encoders = re.findall(r"\[encoder\] encoder listening on (\S+)", "".join(up.lines))
        assert len(set(encoders)) == 2
        for encoder in encoders:
            _wait_for_line(up, f"encoder {encoder} admitted")
        with grpc.insecure_channel(address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            assert _generate(stub, IMAGES[0]) == hf_generate(qwen2_vl_dir, PROMPT, [IMAGES[0]], MAX_NEW_TOKENS)
    finally:
        assert up.stop(signal.SIGTERM) == 0, up.output()
