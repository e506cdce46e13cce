"""Embeddings over the services' message limits cross in chunks or through shared memory, token-exact.

One image of ~4,600 placeholder tokens (the tiny Qwen2-VL with its processor allowed 4 M pixels):
its embeddings (1.2 MB) exceed the 1 MiB --max-message-mib of the processor and the LLM. The
encoder takes 128 MiB, as it receives the image's pixel patches (87 MB) inline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch

from services.client import build_messages
from services.common import chunks, shm
from services.common.api.triptych.common.v1 import generation_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import to_proto
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes
from tests.procs import Proc, spawn, start_encoder, start_llm, start_processor, stop_all, wait_listening, wait_serving
from tests.reference import hf_generate

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfd and /proc")]

PROMPT, IMAGE = "Describe this image.", image_bytes(1900, 1900, seed=3, kind="gradient")
MAX_NEW_TOKENS = 8
LIMIT_MIB = 1
LIMIT = ("--max-message-mib", str(LIMIT_MIB))
ENCODER_LIMIT = ("--max-message-mib", "128")
UNSHARE = ("unshare", "--pid", "--fork", "--kill-child")  # a PID namespace of its own, as a container has


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """The tiny Qwen2-VL, its image processor allowed 4 M pixels (longest_edge), so one image makes
    thousands of placeholder tokens."""
    out = tmp_path_factory.mktemp("models") / "qwen2_vl-4mpx"
    shutil.copytree(tiny_checkpoint("qwen2_vl"), out)
    config_path = out / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["image_processor"]["size"]["longest_edge"] = 4_000_000
    config_path.write_text(json.dumps(config, indent=2))
    return out


@pytest.fixture(scope="module")
def expected(big_model) -> list[int]:
    return hf_generate(big_model, PROMPT, [IMAGE], MAX_NEW_TOKENS)


def _serving(proc: Proc) -> Proc:
    wait_serving(wait_listening(proc))
    return proc


@pytest.fixture(scope="module")
def backends(big_model):
    encoder, llm = start_encoder(big_model, *ENCODER_LIMIT), start_llm(big_model, *LIMIT)
    yield _serving(encoder), _serving(llm)
    stop_all(encoder, llm)


def _processor(model: Path, encoder: Proc, llm: Proc, *flags: str) -> Proc:
    return _serving(start_processor(model, encoder.address, llm.address, None, *LIMIT, *flags))


@pytest.fixture(scope="module")
def inline_processor(big_model, backends):
    processor = _processor(big_model, *backends)
    yield processor
    processor.stop()


def _generate(address: str, images: tuple[bytes, ...] = (IMAGE,)) -> processor_pb2.Completion:
    request = processor_pb2.GenerateRequest(messages=build_messages(PROMPT, list(images)),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    with grpc.insecure_channel(address) as channel:
        return processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion


def _log(proc: Proc) -> str:
    return "".join(proc.lines)


def _holders(pid: int) -> list[str]:
    """The shared-memory regions process `pid` holds open."""
    fds = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fds.iterdir() if fds.is_dir() else ():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [link for link in links if shm.PREFIX in link]


def test_chunked_embeddings_cross_one_mib_limits_token_exact(backends, inline_processor, expected):
    _, llm = backends
    completion = _generate(inline_processor.address)
    assert completion.token_ids == expected
    assert (completion.prompt_tokens - 30) * 64 * 4 > LIMIT_MIB << 20  # one image's embeddings: over the limit
    _wait_for(lambda: "/triptych.llm.v1.LlmService/ChunkedStreamGenerate OK" in _log(llm), timeout_s=10)


def test_one_message_over_the_limit_is_refused(backends):
    # The control: the limit is real, so only chunks got the embeddings through.
    _, llm = backends
    request = llm_pb2.GenerateRequest(prompt=llm_pb2.Prompt(token_ids=[1], multimodal_inputs=[llm_pb2.MultimodalInput(
        embeddings=to_proto(torch.zeros(4200, 64)))]))
    with grpc.insecure_channel(llm.address) as channel, pytest.raises(grpc.RpcError) as caught:
        llm_pb2_grpc.LlmServiceStub(channel).Generate(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_shared_memory_crosses_one_mib_limits_token_exact(big_model, backends, expected):
    encoder, llm = backends
    chunked_before, plain_before = (_log(llm).count(f"LlmService/{rpc} OK") for rpc in ("ChunkedStreamGenerate",
                                                                                          "StreamGenerate"))
    processor = _processor(big_model, encoder, llm, "--embeddings-transport", "shm")
    twice = [image_bytes(160, 120, seed=1)] * 2  # one region, read twice in one request
    try:
        completion = _generate(processor.address)
        repeated = _generate(processor.address, tuple(twice))
    finally:
        processor.stop()
    assert completion.token_ids == expected
    assert repeated.token_ids == hf_generate(big_model, PROMPT, twice, MAX_NEW_TOKENS)
    # Inline, a 1.2 MB LLM request would have gone in chunks: it went as one small message of handles.
    _wait_for(lambda: _log(llm).count("LlmService/StreamGenerate OK") > plain_before, timeout_s=10)
    assert _log(llm).count("LlmService/ChunkedStreamGenerate OK") == chunked_before
    assert "encoding again inline" not in _log(processor)
    # the LLM claimed the region: the encoder lets it go at its reaper's next round (at most 1 s)
    _wait_for(lambda: _holders(encoder.popen.pid) == [], timeout_s=10)


def test_an_llm_that_cannot_open_the_region_gets_the_embeddings_inline(big_model, backends, expected):
    if subprocess.run([*UNSHARE, "true"], capture_output=True, check=False).returncode != 0:
        pytest.skip("unshare --pid is not permitted here")
    _, llm = backends
    # An encoder in its own PID namespace (as in another container): its handles name a pid the LLM cannot see.
    encoder = _serving(spawn("encoder", "serve", "encoder", "--model", str(big_model), "--port", "0",
                             *ENCODER_LIMIT, wrapper=UNSHARE))
    try:
        processor = _processor(big_model, encoder, llm, "--embeddings-transport", "shm")
        try:
            completion = _generate(processor.address)
        finally:
            processor.stop()
    finally:
        # unshare --fork ignores SIGTERM while its child runs (a SIGTERM waited 60 s here, then was killed):
        # SIGKILL it, and --kill-child passes that on to the encoder.
        encoder.stop(signal.SIGKILL)
    assert completion.token_ids == expected
    assert "cannot read the encoder's shared memory" in _log(processor)
    assert "encoding again inline" in _log(processor)


def test_regions_are_freed_after_the_ttl_or_with_a_killed_encoder(big_model, backends, inline_processor):
    _, llm = backends
    encoder = _serving(start_encoder(big_model, *ENCODER_LIMIT, "--shm-ttl-s", "2"))
    try:
        with grpc.insecure_channel(inline_processor.address) as channel:  # a small image: a reply under 1 MiB
            pre = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(processor_pb2.PreprocessRequest(
                messages=build_messages(PROMPT, [image_bytes(160, 120, seed=1)]),
                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=120)
        pre.encode_request.embeddings_transport = encoder_pb2.EMBEDDINGS_TRANSPORT_SHARED_MEMORY
        with grpc.insecure_channel(encoder.address, options=[("grpc.max_receive_message_length", 1 << 30)]) as ch:
            stub = encoder_pb2_grpc.EncoderServiceStub(ch)
            first = stub.Encode(pre.encode_request, timeout=120)
            assert first.items[0].embeddings.HasField("shm")
            pid = encoder.popen.pid
            assert len(_holders(pid)) == 1
            _wait_for(lambda: not _holders(pid), timeout_s=10)  # nobody read it: freed after 2 s
            second = stub.Encode(pre.encode_request, timeout=120)
        assert len(_holders(pid)) == 1
        dev_shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        encoder.stop(signal.SIGKILL)
    finally:
        encoder.stop()
    assert not Path(f"/proc/{pid}").exists()
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert {n for n in after - dev_shm_before if "triptych" in n} == set()
    # The dead encoder's handle, and a malformed one, are refused by the LLM with the documented errors.
    for item, code, reason in [(second.items[0], grpc.StatusCode.FAILED_PRECONDITION, "SHM_REGION_UNAVAILABLE"),
                               (first.items[0], grpc.StatusCode.FAILED_PRECONDITION, "SHM_REGION_UNAVAILABLE")]:
        err = _llm_error(llm, pre.llm_request, item.embeddings)
        assert (err.code(), error_info(err).reason, error_info(err).metadata["cause"]) == (code, reason, "gone")
    bad = encoder_pb2.ItemEmbeddings()
    bad.CopyFrom(second.items[0])
    bad.embeddings.shm.token = "not-a-token"
    err = _llm_error(llm, pre.llm_request, bad.embeddings)
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SHM_HANDLE_INVALID")


def _llm_error(llm: Proc, preprocessed: llm_pb2.GenerateRequest, embeddings) -> grpc.RpcError:
    request = llm_pb2.GenerateRequest()
    request.CopyFrom(preprocessed)
    request.prompt.multimodal_inputs[0].embeddings.CopyFrom(embeddings)
    with grpc.insecure_channel(llm.address) as channel, pytest.raises(grpc.RpcError) as caught:
        llm_pb2_grpc.LlmServiceStub(channel).Generate(request, timeout=60)
    return caught.value


def _wait_for(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def _chunked_error(llm: Proc, messages) -> grpc.RpcError:
    with grpc.insecure_channel(llm.address) as channel, pytest.raises(grpc.RpcError) as caught:
        list(llm_pb2_grpc.LlmServiceStub(channel).ChunkedStreamGenerate(iter(messages), timeout=60))
    return caught.value


def test_a_broken_chunk_stream_is_invalid_argument_and_the_llm_goes_on(backends, expected, inline_processor):
    _, llm = backends
    rows = 4200  # 1.1 MB: over the LLM's limit, so in chunks (1012: the image token of the tiny Qwen2-VL)
    request = llm_pb2.StreamGenerateRequest(prompt=llm_pb2.Prompt(
        token_ids=[1012] * rows + [1], multimodal_inputs=[llm_pb2.MultimodalInput(
            placeholder=tensor_pb2.PlaceholderRange(modality=tensor_pb2.MODALITY_IMAGE, offset=0, length=rows),
            embeddings=to_proto(torch.zeros(rows, 64)))]))
    messages = chunks.split_generate_request(request, chunks.chunk_budget(LIMIT_MIB << 20))
    assert len(messages) == 2

    err = _chunked_error(llm, messages[:1])  # half-closed with bytes missing
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err).reason == "TENSOR_CHUNKS_INCOMPLETE"
    assert error_info(err).metadata["expectedBytes"] == str(rows * 64 * 4)

    err = _chunked_error(llm, [messages[1], messages[0]])
    assert (err.code(), error_info(err).reason) == (grpc.StatusCode.INVALID_ARGUMENT, "TENSOR_CHUNK_INVALID")

    messages[0].request.prompt.multimodal_inputs[0].embeddings.shape[:] = [rows, 4096]  # declares 70 MB
    err = _chunked_error(llm, messages[:1])  # refused on the declaration, before any chunk
    assert error_info(err).reason == "EMBEDDING_SHAPE_MISMATCH"

    assert _generate(inline_processor.address).token_ids == expected  # still serving
