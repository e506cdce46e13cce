"""Request ids across the three services as separate processes: the logs join on x-request-id."""

from __future__ import annotations

import re
import time
import uuid

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes

pytestmark = pytest.mark.e2e


def _lines_with(proc, request_id: str, timeout_s: float = 10) -> list[str]:
    """The process's log lines tagged with the id (access lines are written as each call ends)."""
    deadline = time.monotonic() + timeout_s
    while True:
        lines = [line for line in list(proc.lines) if f"[{request_id}]" in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_logs_of_the_three_services_join_on_the_request_id(qwen2_vl_services):
    request_id = f"join-{uuid.uuid4().hex[:12]}"
    request = processor_pb2.GenerateRequest(messages=build_messages("Describe.", [image_bytes(64, 64, seed=61)]),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=3))
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        _, call = processor_pb2_grpc.ProcessorServiceStub(channel).Generate.with_call(
            request, metadata=(("x-request-id", request_id),), timeout=120)
    assert dict(call.initial_metadata())["x-request-id"] == request_id

    expected = {"processor": "/triptych.processor.v1.ProcessorService/Generate",
                "encoder": "/triptych.encoder.v1.EncoderService/StreamEncode",
                "llm": "/triptych.llm.v1.LlmService/StreamGenerate"}
    for name, method in expected.items():
        lines = _lines_with(getattr(qwen2_vl_services, name), request_id)
        assert any(f"{method} OK" in line for line in lines), f"{name}: {lines}"


def test_a_generated_request_id_is_in_the_services_logs(qwen2_vl_services):
    request = processor_pb2.GenerateRequest(messages=build_messages("Hi.", []),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=2))
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        _, call = processor_pb2_grpc.ProcessorServiceStub(channel).Generate.with_call(request, timeout=120)
    made = dict(call.initial_metadata())["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert _lines_with(qwen2_vl_services.processor, made) and _lines_with(qwen2_vl_services.llm, made)
