"""Start-up, health, reflection, graceful SIGTERM, a service down, another model: as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import image_bytes
from tests.procs import (
    engine_pid,
    spawn,
    start_encoder,
    start_llm,
    start_processor,
    start_services,
    stop_all,
    wait_listening,
)

pytestmark = pytest.mark.e2e

IMAGE = image_bytes(64, 64, seed=21)


def _request(prompt: str, images: list[bytes], max_new_tokens: int = 4, **sampling) -> processor_pb2.GenerateRequest:
    return processor_pb2.GenerateRequest(
        messages=build_messages(prompt, images),
        sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, **sampling))


def test_up_serves_health_reflection_and_generate(qwen2_vl_dir, tmp_path):
    up = spawn("up", "up", "--model", str(qwen2_vl_dir), "--port", "0", listen_name="processor")
    try:
        address = wait_listening(up)
        addresses = dict(re.findall(r"\[\w+\] (\w+) listening on (\S+)", "".join(up.lines)))
        assert set(addresses) == {"encoder", "llm", "processor"}
        expected = {"encoder": "triptych.encoder.v1.EncoderService", "llm": "triptych.llm.v1.LlmService",
                    "processor": "triptych.processor.v1.ProcessorService"}
        for name, addr in addresses.items():
            with grpc.insecure_channel(addr) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                for service in ("", expected[name]):
                    reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
                assert {expected[name], "grpc.health.v1.Health"} <= services

        image = tmp_path / "img.png"
        image.write_bytes(IMAGE)
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "generate", "--server", address, "--prompt", "What is this?",
             "--image", str(image), "--image", str(image), "--max-new-tokens", "6", "--json"],
            capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert isinstance(answer["text"], str) and answer["finish_reason"] in ("stop", "length")
        assert 0 < len(answer["token_ids"]) <= 6 and all(isinstance(t, int) for t in answer["token_ids"])
        assert answer["prompt_tokens"] > 2 * 4  # two images' placeholders at least
    finally:
        assert up.stop(signal.SIGTERM) == 0, up.output()
    assert "exited" not in up.output()


def test_graceful_sigterm_then_downstream_down(qwen2_vl_dir):
    services = start_services(qwen2_vl_dir)
    try:
        with grpc.insecure_channel(services.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            # An in-flight request finishes when the LLM gets SIGTERM.
            long_request = _request("Tell a long story.", [], max_new_tokens=1500, ignore_eos=True)
            result: dict = {}
            worker = threading.Thread(target=lambda: result.update(reply=stub.Generate(long_request, timeout=120)))
            worker.start()
            time.sleep(1.0)
            # As a signal to the process group does (Ctrl-C, systemd): the service and its engine
            # process both get it; the service finishes the request, then stops the engine.
            engine = engine_pid(services.llm.popen.pid)
            services.llm.popen.send_signal(signal.SIGTERM)
            os.kill(engine, signal.SIGTERM)
            worker.join(120)
            assert result["reply"].completion.completion_tokens == 1500
            assert services.llm.popen.wait(60) == 0
            assert not Path(f"/proc/{engine}").exists()  # stopped with the service, not left behind

            # LLM down: UNAVAILABLE naming the LLM, promptly.
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(_request("hi", []), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "llm" in caught.value.details() and time.monotonic() - started < 30

            # Encoder down too: an image request names the encoder.
            services.encoder.stop(signal.SIGKILL)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(_request("hi", [IMAGE]), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "encoder" in caught.value.details()

            # The processor itself keeps serving.
            assert stub.GetModelInfo(processor_pb2.GetModelInfoRequest(), timeout=10).model_info.family == "qwen2_vl"
    finally:
        services.stop()


def test_another_model_is_failed_precondition(qwen2_vl_dir, qwen2_vl_other_dir):
    encoder, llm = start_encoder(qwen2_vl_dir), start_llm(qwen2_vl_other_dir)
    try:
        encoder_addr, llm_addr = wait_listening(encoder), wait_listening(llm)
        processor = start_processor(qwen2_vl_dir, encoder_addr, llm_addr)
        assert processor.popen.wait(120) != 0
        assert "MODEL_FINGERPRINT_MISMATCH" in processor.output() or "serves model" in processor.output()

        with grpc.insecure_channel(llm_addr) as channel:
            stub = llm_pb2_grpc.LlmServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.Generate(llm_pb2.GenerateRequest(model_fingerprint="0123456789abcdef",
                                                      prompt=llm_pb2.Prompt(token_ids=[1, 2, 3])), timeout=10)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_info(caught.value).reason == "MODEL_FINGERPRINT_MISMATCH"
    finally:
        encoder.stop()
        llm.stop()


def test_embedding_dtypes_that_differ_refuse_to_start(qwen2_vl_dir):
    """A bf16 encoder with a float32 LLM used to start and then fail every image request."""
    encoder, llm_f32 = start_encoder(qwen2_vl_dir, "--dtype", "bfloat16"), start_llm(qwen2_vl_dir)
    llm_bf16 = start_llm(qwen2_vl_dir, "--dtype", "bfloat16")
    try:
        encoder_addr, f32_addr, bf16_addr = (wait_listening(p) for p in (encoder, llm_f32, llm_bf16))
        mixed = start_processor(qwen2_vl_dir, encoder_addr, f32_addr, None, "--dtype", "bfloat16")
        assert mixed.popen.wait(120) == 1
        assert "SERVICE_DTYPE_MISMATCH" in mixed.output(), mixed.output()
        assert "makes bfloat16 embeddings but the LLM" in mixed.output() and "takes float32" in mixed.output()

        # Encoder and LLM agree, but the processor (which reports the dtype to callers) says otherwise.
        own = start_processor(qwen2_vl_dir, encoder_addr, bf16_addr)
        assert own.popen.wait(120) == 1
        assert "SERVICE_DTYPE_MISMATCH" in own.output() and "--dtype float32" in own.output(), own.output()
    finally:
        stop_all(encoder, llm_f32, llm_bf16)
