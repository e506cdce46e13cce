"""`triptych up --encoders 2`: several encoder processes behind one processor. (An encoder replica
killed mid-stream, and coming back on its port: tests/reliability/test_faults.py.)"""

from __future__ import annotations

import re
import signal
import time

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes
from tests.procs import Proc, spawn, wait_listening
from tests.reference import hf_generate

pytestmark = pytest.mark.e2e

PROMPT = "Describe the picture."
MAX_NEW_TOKENS = 6
IMAGES = [image_bytes(64 + 16 * i, 64 + 8 * (i % 3), seed=300 + i) for i in range(5)]


def _generate(stub, image: bytes) -> list[int]:
    reply = stub.Generate(processor_pb2.GenerateRequest(
        messages=build_messages(PROMPT, [image]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=300)
    return list(reply.completion.token_ids)


def _wait_for_line(proc: Proc, text: str, times: int = 1, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(text in line for line in proc.lines) < times:
        assert time.monotonic() < deadline, f"{proc.name} never logged {text!r}:\n{proc.output()}"
        time.sleep(0.1)


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
