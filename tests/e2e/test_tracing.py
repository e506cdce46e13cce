"""OpenTelemetry across the three services: one request is one trace, its context carried in gRPC metadata.

The services run in this process on port-0 servers (tests/inproc.py) so that one in-memory exporter
sees every span; they still talk over real gRPC connections, and each server's span finds its parent
only in the metadata its caller sent (a server's call runs in a task of its own, which inherits no
context from the client's task).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.client import build_messages
from services.common import tracing
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.inproc import InProcessServices
from tests.media import image_bytes

PROCESSOR = "/triptych.processor.v1.ProcessorService/Generate"
ENCODER = "/triptych.encoder.v1.EncoderService/StreamEncode"
LLM = "/triptych.llm.v1.LlmService/StreamGenerate"


def test_off_by_default_nothing_is_installed(monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert not tracing.requested(False) and tracing.requested(True)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert not tracing.requested(False)
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    assert tracing.requested(False)
    assert not tracing.enabled()
    assert tracing.server_interceptors() == [] and tracing.client_interceptors() == []
    assert tracing.span("x") is tracing.span("y")  # one shared no-op: no span objects made
    # Off, the services do not even import opentelemetry.
    code = ("import sys, services.processor.server, services.encoder.server, services.llm.server; "
            "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def traced(qwen2_vl_dir):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)  # before the servers and the processor's channels are made
    try:
        services = InProcessServices(qwen2_vl_dir)
        yield services, exporter
        services.stop()
    finally:
        tracing.disable()  # the other tests' servers stay untraced


def _generate(address: str, request_id: str, max_new_tokens: int = 4) -> processor_pb2.Completion:
    request = processor_pb2.GenerateRequest(
        messages=build_messages("Describe.", [image_bytes(64, 48, seed=7)]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens))
    with grpc.insecure_channel(address) as channel:
        return processor_pb2_grpc.ProcessorServiceStub(channel).Generate(
            request, metadata=(("x-request-id", request_id),), timeout=120).completion


def test_one_request_is_one_trace_across_the_three_services(traced):
    services, exporter = traced
    exporter.clear()
    completion = _generate(services.address, "trace-one")
    assert completion.completion_tokens == 4
    spans = exporter.get_finished_spans()
    by_kind = {(s.name, s.kind): s for s in spans}
    server = {name: by_kind[(name, SpanKind.SERVER)] for name in (PROCESSOR, ENCODER, LLM)}
    root = server[PROCESSOR]
    assert root.parent is None  # the client sent no context: the processor starts the trace
    assert {s.context.trace_id for s in spans} == {root.context.trace_id}, "spans outside the request's trace"

    # Each downstream server span is the child of the processor's client span for that call, which is
    # the child of the processor's server span (or of its stage span): the context crossed in metadata.
    ids = {s.context.span_id: s for s in spans}
    for method in (ENCODER, LLM):
        parent = ids[server[method].parent.span_id]
        assert parent.kind == SpanKind.CLIENT and parent.name == method
    # The request id is on every server span, next to the trace context.
    assert all(server[m].attributes["triptych.request_id"] == "trace-one" for m in server)

    stages = {s.name: s for s in spans if s.kind == SpanKind.INTERNAL}
    for stage in ("media.decode", "hf_processor", "encode", "encoder.inputs", "encoder.tower", "llm.parse",
                  "llm.queue", "llm.prefill", "llm.decode"):
        assert stage in stages, f"no {stage} span: {sorted(stages)}"
    assert ids[stages["media.decode"].parent.span_id] is root and ids[stages["hf_processor"].parent.span_id] is root
    assert ids[stages["encoder.tower"].parent.span_id] is server[ENCODER]
    for stage in ("llm.queue", "llm.prefill", "llm.decode"):
        assert ids[stages[stage].parent.span_id] is server[LLM]
    # The engine's stages follow one another inside the LLM's call (the engine process's clock is ours).
    queue, prefill, decode = stages["llm.queue"], stages["llm.prefill"], stages["llm.decode"]
    assert server[LLM].start_time <= queue.start_time <= queue.end_time == prefill.start_time
    assert prefill.end_time == decode.start_time <= decode.end_time <= server[LLM].end_time
    assert decode.attributes["tokens"] == 4


def test_two_requests_are_two_traces(traced):
    services, exporter = traced
    exporter.clear()
    _generate(services.address, "trace-a", 2)
    _generate(services.address, "trace-b", 2)
    roots = [s for s in exporter.get_finished_spans() if s.name == PROCESSOR and s.kind == SpanKind.SERVER]
    assert len(roots) == 2 and roots[0].context.trace_id != roots[1].context.trace_id


def test_health_checks_are_not_traced(traced):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    services, exporter = traced
    exporter.clear()
    with grpc.insecure_channel(services.address) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert exporter.get_finished_spans() == ()


def test_chunked_streams_are_traced_too(traced, qwen2_vl_dir):
    """A request larger than the LLM's message budget goes through the bidirectional ChunkedStreamGenerate:
    the client interceptors of every call shape carry the context (here a budget of a few KB forces it)."""
    import asyncio

    from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
    from services.common.api.triptych.llm.v1 import llm_pb2
    from services.models.checkpoint import Checkpoint
    from services.processor.router import LlmClient

    services, exporter = traced
    with grpc.insecure_channel(services.address) as channel:
        prepared = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(processor_pb2.PreprocessRequest(
            messages=build_messages("Describe.", [image_bytes(256, 256, seed=9)]),
            sampling=generation_pb2.SamplingParams(max_new_tokens=3, ignore_eos=True)), timeout=60)
    with grpc.insecure_channel(services.encoder_address) as channel:
        encoded = encoder_pb2_grpc.EncoderServiceStub(channel).Encode(prepared.encode_request, timeout=60)
    request = llm_pb2.StreamGenerateRequest(model_fingerprint=prepared.llm_request.model_fingerprint,
                                            prompt=prepared.llm_request.prompt, sampling=prepared.llm_request.sampling)
    (mm,) = request.prompt.multimodal_inputs
    mm.embeddings.CopyFrom(encoded.items[0].embeddings)
    assert len(mm.embeddings.data) > 8192

    async def generate() -> list[int]:
        client = LlmClient(services.llm_address, Checkpoint(qwen2_vl_dir).fingerprint, max_message_bytes=70_000)
        client.chunk_bytes = 4096  # the smallest chunk: the embeddings take several messages
        try:
            with tracing.span("test.root"):
                return [t async for reply in client.stream_generate(request, 60) for t in reply.token_ids]
        finally:
            await client.close()

    exporter.clear()
    assert len(asyncio.run(generate())) == 3
    spans = exporter.get_finished_spans()
    chunked = {s.kind: s for s in spans if s.name == "/triptych.llm.v1.LlmService/ChunkedStreamGenerate"}
    root = next(s for s in spans if s.name == "test.root")
    assert chunked[SpanKind.CLIENT].parent.span_id == root.context.span_id
    assert chunked[SpanKind.SERVER].parent.span_id == chunked[SpanKind.CLIENT].context.span_id
    assert any(s.name == "llm.decode" and s.parent.span_id == chunked[SpanKind.SERVER].context.span_id for s in spans)
