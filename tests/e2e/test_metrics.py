"""Prometheus metrics of the three services as separate processes, scraped after known traffic."""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes
from tests.procs import start_encoder, start_llm, start_processor, stop_all, wait_listening, wait_serving

pytestmark = pytest.mark.e2e

GENERATE = "/triptych.processor.v1.ProcessorService/Generate"
STREAM_ENCODE = "/triptych.encoder.v1.EncoderService/StreamEncode"
STREAM_GENERATE = "/triptych.llm.v1.LlmService/StreamGenerate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, labels) -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def services(qwen2_vl_dir):
    ports = {"encoder": free_port(), "llm": free_port(), "processor": free_port()}
    encoder = start_encoder(qwen2_vl_dir, "--metrics-port", str(ports["encoder"]))
    llm = start_llm(qwen2_vl_dir, "--metrics-port", str(ports["llm"]))
    processor = start_processor(qwen2_vl_dir, wait_listening(encoder), wait_listening(llm), None,
                                "--metrics-port", str(ports["processor"]))
    procs = {"encoder": encoder, "llm": llm, "processor": processor}
    try:
        wait_listening(processor)
        for proc in procs.values():
            wait_serving(proc.address)
        yield procs, ports
    finally:
        stop_all(*(procs[name] for name in ("processor", "encoder", "llm")))


def _request(image: bytes, max_new_tokens: int) -> processor_pb2.GenerateRequest:
    return processor_pb2.GenerateRequest(
        messages=build_messages("Describe.", [image]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def test_counts_after_three_requests_with_one_image(services):
    procs, ports = services
    image = image_bytes(64, 48, seed=23)
    with grpc.insecure_channel(procs["processor"].address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        completions = [stub.Generate(_request(image, 4), timeout=120).completion for _ in range(3)]
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(processor_pb2.GenerateRequest(), timeout=30)  # no messages
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [c.completion_tokens for c in completions] == [4, 4, 4]
    prompt_tokens = completions[0].prompt_tokens
    # The embedding bytes of the image, as the encoder returns them (one call to it directly).
    with grpc.insecure_channel(procs["processor"].address) as channel:
        encode_request = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(processor_pb2.PreprocessRequest(
            messages=build_messages("Describe.", [image])), timeout=60).encode_request
    with grpc.insecure_channel(procs["encoder"].address) as channel:
        reply = encoder_pb2_grpc.EncoderServiceStub(channel).Encode(encode_request, timeout=60)
    embedding_bytes = sum(len(item.embeddings.data) for item in reply.items)
    assert embedding_bytes > 0

    processor = scrape(ports["processor"])
    assert value(processor, "triptych_rpc_requests_total", method=GENERATE, code="OK") == 3
    assert value(processor, "triptych_rpc_requests_total", method=GENERATE, code="INVALID_ARGUMENT") == 1
    assert value(processor, "triptych_rpc_duration_seconds_count", method=GENERATE) == 4
    assert value(processor, "triptych_time_to_first_token_seconds_count") == 3
    assert value(processor, "triptych_time_per_output_token_seconds_count") == 3
    # Media mode: the image's file went to the encoder once, then the encoder held it (cache references).
    assert value(processor, "triptych_tensor_bytes_sent_total", link="encoder_request") == len(image)
    assert value(processor, "triptych_tensor_bytes_sent_total", link="llm_request") == 3 * embedding_bytes
    replica = procs["encoder"].address
    assert value(processor, "triptych_encoder_replica_healthy", replica=replica) == 1
    assert value(processor, "triptych_encoder_replica_calls_total", replica=replica) == 3
    assert value(processor, "triptych_encoder_replica_references_total", replica=replica) == 2

    encoder = scrape(ports["encoder"])
    assert value(encoder, "triptych_rpc_requests_total", method=STREAM_ENCODE, code="OK") == 3
    # The processor's admission probe: a cache reference the encoder does not hold.
    assert value(encoder, "triptych_rpc_requests_total", method=STREAM_ENCODE, code="NOT_FOUND") == 1
    assert value(encoder, "triptych_encoder_cache_misses_total") == 1
    assert value(encoder, "triptych_encoder_cache_hits_total") == 3  # two references + our direct Encode
    assert value(encoder, "triptych_encoder_cache_evictions_total") == 0
    assert value(encoder, "triptych_encoder_batch_items_count") == 1  # one tower forward, of one item
    assert value(encoder, "triptych_encoder_batch_items_sum") == 1
    assert value(encoder, "triptych_encoder_batch_items_bucket", le="1.0") == 1
    assert value(encoder, "triptych_encoder_queue_items") == 0
    assert value(encoder, "triptych_tensor_bytes_sent_total", link="encoder_reply") == 4 * embedding_bytes

    llm = scrape(ports["llm"])
    assert value(llm, "triptych_rpc_requests_total", method=STREAM_GENERATE, code="OK") == 3
    assert value(llm, "triptych_time_to_first_token_seconds_count") == 3
    assert value(llm, "triptych_time_per_output_token_seconds_count") == 3
    assert value(llm, "triptych_llm_generated_tokens_total") == 12
    assert value(llm, "triptych_llm_prompt_tokens_total") == 3 * prompt_tokens
    assert value(llm, "triptych_llm_requests_waiting") == 0 and value(llm, "triptych_llm_requests_running") == 0


def test_running_and_waiting_gauges_follow_a_streaming_request(services):
    procs, ports = services
    request = processor_pb2.StreamGenerateRequest(
        messages=build_messages("Count.", []),
        sampling=generation_pb2.SamplingParams(max_new_tokens=3000, ignore_eos=True))
    with grpc.insecure_channel(procs["processor"].address) as channel:
        stream = processor_pb2_grpc.ProcessorServiceStub(channel).StreamGenerate(request, timeout=120)
        next(stream)  # a first token: the request is in the running batch now
        during = scrape(ports["llm"])
        stream.cancel()
    assert value(during, "triptych_llm_requests_running") == 1
    assert value(during, "triptych_llm_requests_waiting") == 0
    for _ in range(50):  # the cancellation reaches the LLM
        after = scrape(ports["llm"])
        if value(after, "triptych_llm_requests_running") == 0:
            break
        time.sleep(0.1)
    assert value(after, "triptych_llm_requests_running") == 0
    assert value(after, "triptych_rpc_requests_total", method=STREAM_GENERATE, code="CANCELLED") == 1
