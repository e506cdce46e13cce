"""`triptych serve encoder --backend triton` as its own process in front of a real tritonserver: it serves
the torch backend's bytes and names its backend; Triton down -> UNAVAILABLE naming Triton and health
NOT_SERVING, and served again once Triton is back (same port); a model missing from the repository or exported from another
checkpoint -> FAILED_PRECONDITION at start."""

from __future__ import annotations

import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cli import main as cli_main
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig
from services.common.errors import FailedPrecondition, error_info
from services.common.tensors import from_proto
from services.encoder.backends.torch_backend import TorchBackend
from services.encoder.backends.triton_backend import TritonBackend
from services.encoder.server import SERVICE as ENCODER_SERVICE
from services.models.checkpoint import Checkpoint
from tests.encoder.helpers import CHANNEL_OPTIONS, item_inputs, media_item
from tests.encoder.triton_server import TritonServer
from tests.procs import start_encoder, wait_listening, wait_serving

pytestmark = pytest.mark.e2e
SERVICE = ENCODER_SERVICE.full_name


def wait_health(channel: grpc.Channel, status: int, timeout_s: float = 30) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while (got := stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status) != status:
        assert time.monotonic() < deadline, f"health stayed {got}, expected {status}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def triton(tmp_path_factory, qwen2_vl_dir):
    repo = tmp_path_factory.mktemp("triton-repo")
    assert cli_main(["export-triton", "--model", str(qwen2_vl_dir), "--out", str(repo), "--name", "tiny"]) == 0
    server = TritonServer(repo, repo.parent / "tritonserver.log").start()
    yield server
    server.stop()


def test_encoder_in_front_of_triton_survives_triton_restarts(triton, qwen2_vl_dir):
    checkpoint = Checkpoint(qwen2_vl_dir)
    family = checkpoint.family
    processor = family.load_processor(qwen2_vl_dir)
    inputs = [item_inputs(family, processor, 112 + 28 * i, 112, seed=i) for i in range(3)]
    local = TorchBackend(checkpoint, "cpu")
    expected = [local.run("image", [tensors])[0].embeddings for tensors in inputs]

    # In this process, through shared memory: a restarted Triton has forgotten the region it registered.
    shm = TritonBackend(checkpoint, EncoderConfig(model=qwen2_vl_dir, backend="triton", triton_url=triton.url,
                                                  triton_model="tiny", triton_transport="shm"))
    assert torch.equal(shm.run("image", inputs[:1])[0].embeddings, expected[0])
    proc = start_encoder(qwen2_vl_dir, "--backend", "triton", "--triton-url", triton.url, "--triton-model", "tiny",
                         "--cache-mib", "0")
    try:
        address = wait_listening(proc)
        wait_serving(address)
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = encoder_pb2_grpc.EncoderServiceStub(channel)

            def encode(index: int) -> torch.Tensor:
                request = encoder_pb2.EncodeRequest(model_fingerprint=checkpoint.fingerprint,
                                                    items=[media_item(f"i{index}", inputs[index])])
                return from_proto(stub.Encode(request, timeout=120).items[0].embeddings)

            info = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=30)
            assert info.backend == encoder_pb2.ENCODER_BACKEND_TRITON
            assert info.model_info.fingerprint == checkpoint.fingerprint
            assert torch.equal(encode(0), expected[0])

            triton.stop()
            with pytest.raises(grpc.RpcError) as caught:
                encode(1)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "TRITON_UNAVAILABLE"
            assert f"Triton at {triton.url}" in caught.value.details()
            wait_health(channel, health_pb2.HealthCheckResponse.NOT_SERVING)  # a processor's pool ejects it

            triton.start()
            wait_health(channel, health_pb2.HealthCheckResponse.SERVING)
            assert torch.equal(encode(1), expected[1])
            assert torch.equal(encode(2), expected[2])
            assert torch.equal(shm.run("image", inputs[2:])[0].embeddings, expected[2])
    finally:
        shm.close()
        assert proc.stop() == 0, proc.output()


def test_missing_model_fails_the_start(triton, qwen2_vl_dir):
    proc = start_encoder(qwen2_vl_dir, "--backend", "triton", "--triton-url", triton.url, "--triton-model", "absent")
    assert proc.popen.wait(120) == 1, proc.output()
    proc.ready.wait(10)  # the output's last lines are in
    assert "[TRITON_MODEL_MISSING]" in proc.output() and "'absent_image'" in proc.output(), proc.output()
    with pytest.raises(FailedPrecondition) as caught:  # the status the start fails with
        TritonBackend(Checkpoint(qwen2_vl_dir), EncoderConfig(model=qwen2_vl_dir, backend="triton",
                                                              triton_url=triton.url, triton_model="absent"))
    assert caught.value.reason == "TRITON_MODEL_MISSING"
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "tiny_image" in caught.value.message  # what the repository has instead


def test_model_of_another_checkpoint_fails_the_start(triton, qwen2_vl_other_dir):
    with pytest.raises(FailedPrecondition) as caught:
        TritonBackend(Checkpoint(qwen2_vl_other_dir), EncoderConfig(model=qwen2_vl_other_dir, backend="triton",
                                                                    triton_url=triton.url, triton_model="tiny"))
    assert caught.value.reason == "TRITON_MODEL_MISMATCH"
    assert Checkpoint(qwen2_vl_other_dir).fingerprint in caught.value.message
