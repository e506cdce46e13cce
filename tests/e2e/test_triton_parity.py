"""Processor, encoder (--backend triton) and LLM as three processes, the towers in a real tritonserver:
greedy tokens equal transformers' run whole (tests/parity.py's image and video cases), for Qwen2-VL,
whose two towers (image, video) are two Triton models. (Qwen3-VL's deepstack rows are compared
bitwise with the torch backend's in tests/encoder/test_triton_backend.py.) The processor and the LLM
cannot tell the backends apart: the three services' ModelInfo agree; only the encoder's GetModelInfo
names Triton."""

from __future__ import annotations

import grpc
import pytest

from services.cli import main as cli_main
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from tests.checkpoints import tiny_checkpoint
from tests.encoder.triton_server import TritonServer
from tests.parity import VIDEO_CASES, media_parity_tests, model_info_test, parity_tests
from tests.procs import ServiceSet, start_encoder, start_llm, start_processor, wait_listening, wait_serving

FAMILY = "qwen2_vl"


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    model = tiny_checkpoint(FAMILY)
    repo = tmp_path_factory.mktemp("triton-repo")
    assert cli_main(["export-triton", "--model", str(model), "--out", str(repo)]) == 0
    triton = TritonServer(repo, repo.parent / "tritonserver.log").start()
    encoder = start_encoder(model, "--backend", "triton", "--triton-url", triton.url)
    llm = start_llm(model)
    processor = start_processor(model, wait_listening(encoder), wait_listening(llm))
    wait_listening(processor)
    for proc in (encoder, llm, processor):
        wait_serving(proc.address)
    started = ServiceSet(encoder, llm, processor)
    yield started
    started.stop()
    triton.stop()


test_parity = parity_tests(FAMILY)
test_video_parity = media_parity_tests(FAMILY, VIDEO_CASES)
test_model_info = model_info_test(FAMILY)


@pytest.mark.e2e
def test_encoder_names_its_backend(services):
    with grpc.insecure_channel(services.encoder.address) as channel:
        info = encoder_pb2_grpc.EncoderServiceStub(channel).GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=30)
    assert info.backend == encoder_pb2.ENCODER_BACKEND_TRITON
