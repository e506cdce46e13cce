"""Graceful shutdown under load, each service a process: SIGTERM with streams in flight.

For each service: health turns NOT_SERVING at once, while the listener still accepts for --drain-s (a
probe sees NOT_SERVING before it is refused, so a mesh or the processor's encoder pool routes
elsewhere first); then new requests are refused with UNAVAILABLE; the requests in flight finish,
complete and equal to transformers' answer, within --grace-s; the process exits 0.
(tests/e2e/test_lifecycle.py covers SIGTERM to the LLM's whole process group, engine included.)
"""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import pytest
import torch

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.errors import error_info
from services.common.tensors import from_proto, to_named
from tests.media import image_bytes
from tests.procs import spawn, wait_listening
from tests.reference import _load, hf_generate
from tests.reliability.cluster import Cluster, Stream, generate, request, start_stream, trace_health

pytestmark = pytest.mark.e2e

DRAIN_S, GRACE_S = 1.0, 30.0
NUM_STREAMS = 6
# Long enough to outlast the drain: ~2 s for 6 streams on a quiet 2-core machine.
LONG_TOKENS = 800
IMAGE = image_bytes(64, 64, seed=1)
PROMPTS = [("Tell a long story.", []), ("Tell a long story.", [IMAGE])]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster(qwen2_vl_dir):
    cluster = Cluster.start(qwen2_vl_dir, 2, "--drain-s", str(DRAIN_S), "--grace-s", str(GRACE_S))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def expected(qwen2_vl_dir) -> list[list[int]]:
    """transformers' greedy answer to each of PROMPTS."""
    answers = [hf_generate(qwen2_vl_dir, prompt, images, LONG_TOKENS) for prompt, images in PROMPTS]
    assert answers[0] != answers[1] and min(map(len, answers)) > 300  # long streams, and the image counts
    return answers


def _streams_in_flight(address: str) -> list[Stream]:
    """NUM_STREAMS streams, PROMPTS alternating, each once it has its first token (decoding)."""
    streams = [start_stream(address, request(*PROMPTS[i % 2], LONG_TOKENS), TIMEOUT_S) for i in range(NUM_STREAMS)]
    for stream in streams:
        assert stream.first_token.wait(TIMEOUT_S) and stream.error is None, stream.error
    return streams


def _check_finished(streams: list[Stream], expected: list[list[int]], signalled: float) -> None:
    for i, stream in enumerate(streams):
        assert stream.done.wait(DRAIN_S + GRACE_S)
        assert stream.error is None, f"stream {i}: {stream.error.code().name} {stream.error.details()}"
        assert stream.tokens == expected[i % 2], f"stream {i} is not transformers' answer"
        assert stream.ended_at - signalled < DRAIN_S + GRACE_S


def _sigterm_under_load(cluster: Cluster, proc) -> tuple[list[Stream], float]:
    """SIGTERM `proc` with NUM_STREAMS streams in flight through the processor; checks the health trace."""
    streams = _streams_in_flight(cluster.processor.address)
    signalled = time.monotonic()
    proc.popen.send_signal(signal.SIGTERM)
    trace = trace_health(proc.address, timeout_s=DRAIN_S + GRACE_S)
    assert trace.not_serving_s is not None, f"{proc.name}: health never said NOT_SERVING before it was refused"
    assert trace.refused_s is not None and trace.not_serving_s < trace.refused_s
    assert trace.refused_s >= DRAIN_S * 0.9, f"{proc.name} stopped accepting before the drain ended: {trace}"
    assert any(not s.done.is_set() for s in streams), "no stream outlived the drain: nothing proves the grace"
    print(f"{proc.name}: NOT_SERVING after {trace.not_serving_s * 1000:.0f} ms, refused after {trace.refused_s:.2f} s")
    return streams, signalled


def _refused(address: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        generate(address, request("hi", [], 4), timeout_s=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    return caught.value


# ---- the encoder: the processor's pool drains it, direct calls in flight finish -------------------
GRID = (1, 64, 64)  # an image of 4096 patches, sent as tensors as a router would: ~0.1 s of tower work each
NUM_DIRECT = 12


def _direct_request(fingerprint: str, seed: int) -> encoder_pb2.EncodeRequest:
    pixels = torch.randn(GRID[0] * GRID[1] * GRID[2], 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(seed))
    return encoder_pb2.EncodeRequest(model_fingerprint=fingerprint, items=[encoder_pb2.MediaItem(
        modality=tensor_pb2.MODALITY_IMAGE, tensors=to_named({"pixel_values": pixels,
                                                               "image_grid_thw": torch.tensor([GRID])}))])


def test_encoder_sigterm_drains_it_from_the_pool_and_finishes_its_calls(cluster, qwen2_vl_dir):
    drained, other = cluster.encoders
    with grpc.insecure_channel(drained.address) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        fingerprint = stub.GetModelInfo(encoder_pb2.GetModelInfoRequest(), timeout=10).model_info.fingerprint
        requests = [_direct_request(fingerprint, seed) for seed in range(NUM_DIRECT)]
        # Image requests through the processor all along: none may fail while one replica drains.
        images = [image_bytes(64 + 8 * i, 64, seed=40 + i) for i in range(3)]
        answers = {i: hf_generate(qwen2_vl_dir, "Describe it.", [images[i]], 6) for i in range(3)}
        stop, failures, served = threading.Event(), [], []

        def load(worker: int) -> None:
            while not stop.is_set():
                i = (worker + len(served)) % 3
                try:
                    served.append(generate(cluster.processor.address, request("Describe it.", [images[i]], 6)) == answers[i])
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")

        workers = [threading.Thread(target=load, args=(w,)) for w in range(2)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        calls = [stub.Encode.future(r, timeout=TIMEOUT_S) for r in requests]  # queued at its tower
        time.sleep(0.1)
        drained.popen.send_signal(signal.SIGTERM)
        trace = trace_health(drained.address, timeout_s=DRAIN_S + GRACE_S)
        pending_at_close = sum(not c.done() for c in calls)
        # The processor's pool saw NOT_SERVING and stopped routing there before the listener closed.
        ejected = any(f"encoder {drained.address} ejected: health NOT_SERVING" in line
                      for line in cluster.processor.lines)
        stop.set()
        for worker in workers:
            worker.join(TIMEOUT_S)
        assert trace.not_serving_s is not None and trace.not_serving_s < trace.refused_s, trace
        assert ejected, cluster.processor.output()
        assert failures == [] and served and all(served), (failures, served)

        # The direct calls in flight at the signal all finish with the whole model's embeddings.
        model = _load(qwen2_vl_dir, "AutoModelForImageTextToText")[0]
        for req, call in zip(requests, calls, strict=True):
            tensors = {t.name: from_proto(t.tensor) for t in req.items[0].tensors}
            with torch.inference_mode():
                reference = torch.cat(model.model.get_image_features(tensors["pixel_values"],
                                                                     tensors["image_grid_thw"]).pooler_output)
            torch.testing.assert_close(from_proto(call.result().items[0].embeddings), reference)
        with pytest.raises(grpc.RpcError) as caught:  # new calls: refused
            stub.Encode(requests[0], timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert drained.popen.wait(GRACE_S) == 0, drained.output()
    print(f"encoder: NOT_SERVING after {trace.not_serving_s * 1000:.0f} ms, refused after {trace.refused_s:.2f} s, "
          f"{len(served)} requests through the processor meanwhile, all answered; {pending_at_close} of "
          f"{NUM_DIRECT} direct calls still running when the listener closed")
    assert other.popen.poll() is None


# ---- the HTTP front: readiness 503 first, its streams finish -----------------------------------------
def _front_stream(base: str, out: dict) -> None:
    """One streamed chat completion of PROMPTS[0]; its text and finish reason into `out`."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0][0]}],
            "max_completion_tokens": LONG_TOKENS, "temperature": 0, "stream": True}
    text, finish = [], None
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT_S) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text.append(choice["delta"].get("content") or "")
                finish = choice.get("finish_reason") or finish
                out["started"] = True
    out.update(text="".join(text), finish=finish, status=reply.status_code)


def test_front_sigterm_says_not_ready_first_and_finishes_streams(cluster, expected):
    reference = start_stream(cluster.processor.address, request(*PROMPTS[0], LONG_TOKENS), TIMEOUT_S)
    front = spawn("front", "serve", "front", "--processor", cluster.processor.address, "--port", "0",
                  "--served-model-name", "tiny", "--drain-s", str(DRAIN_S), "--grace-s", str(GRACE_S))
    base = f"http://{wait_listening(front)}"
    try:
        results = [{} for _ in range(2)]
        threads = [threading.Thread(target=_front_stream, args=(base, out)) for out in results]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not all(r.get("started") for r in results):
            assert time.monotonic() < deadline and all(t.is_alive() for t in threads), results
            time.sleep(0.02)
        front.popen.send_signal(signal.SIGTERM)
        signalled, not_ready_s = time.monotonic(), None
        while True:  # the probe: 503 FRONT_SHUTTING_DOWN while the port still answers, then refused
            try:
                reply = httpx.get(f"{base}/health/ready", timeout=2)
            except httpx.TransportError:
                refused_s = time.monotonic() - signalled
                break
            if reply.status_code == 503 and reply.json()["error"]["code"] == "FRONT_SHUTTING_DOWN":
                not_ready_s = not_ready_s if not_ready_s is not None else time.monotonic() - signalled
            assert time.monotonic() - signalled < DRAIN_S + GRACE_S
            time.sleep(0.02)
        assert not_ready_s is not None and not_ready_s < refused_s and refused_s >= DRAIN_S * 0.9
        for thread in threads:
            thread.join(DRAIN_S + GRACE_S)
        assert reference.done.wait(TIMEOUT_S) and reference.tokens == expected[0]
        for out in results:
            assert out == {"started": True, "text": reference.completion.text, "finish": "length", "status": 200}
        assert front.popen.wait(GRACE_S) == 0, front.output()
        print(f"front: /health/ready 503 after {not_ready_s * 1000:.0f} ms, refused after {refused_s:.2f} s")
    finally:
        front.stop()


def test_processor_sigterm_finishes_streams_refuses_new_ones(cluster, expected):
    address = cluster.processor.address
    streams, signalled = _sigterm_under_load(cluster, cluster.processor)
    _refused(address)  # nobody listens: the channel's own UNAVAILABLE
    _check_finished(streams, expected, signalled)
    assert cluster.processor.popen.wait(GRACE_S) == 0, cluster.processor.output()

    cluster.restart_processor()
    assert generate(address, request(*PROMPTS[1], 8)) == expected[1][:8]


def test_llm_sigterm_finishes_streams_refuses_new_ones(cluster, expected):
    streams, signalled = _sigterm_under_load(cluster, cluster.llm)
    # Refused now: the processor says the LLM is unavailable.
    err = _refused(cluster.processor.address)
    assert error_info(err).reason == "LLM_UNAVAILABLE", err.details()
    _check_finished(streams, expected, signalled)
    assert cluster.llm.popen.wait(GRACE_S) == 0, cluster.llm.output()
    # (An LLM started again on its port is answered through the processor: test_faults.py.)
