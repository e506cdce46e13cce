"""The production server bootstrap as tests build it: error domains, request ids, reflection v1 + v1alpha."""

from __future__ import annotations

import logging
import re

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from services.common.interceptors import REQUEST_ID_KEY, RequestIdFilter
from services.common.reflection import V1Request, V1Response
from tests.inproc import InProcessServices
from tests.media import image_bytes

SHORT = generation_pb2.SamplingParams(max_new_tokens=2)


@pytest.fixture(scope="module")
def services(qwen2_vl_dir):
    services = InProcessServices(qwen2_vl_dir)
    yield services
    services.stop()


@pytest.fixture(scope="module")
def processor(services):
    with grpc.insecure_channel(services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def _request_id(call) -> str:
    return dict(call.initial_metadata())[REQUEST_ID_KEY]


# ---- errors: the domain in-process equals production's ----

def test_error_domain_names_the_reporting_service(services, processor):
    with pytest.raises(grpc.RpcError) as caught:
        processor.Generate(processor_pb2.GenerateRequest(), timeout=30)
    assert error_info(caught.value).domain == "triptych.processor"
    with grpc.insecure_channel(services.encoder_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            encoder_pb2_grpc.EncoderServiceStub(channel).Encode(
                encoder_pb2.EncodeRequest(model_fingerprint="0" * 16), timeout=30)
    assert error_info(caught.value).domain == "triptych.encoder"
    with grpc.insecure_channel(services.llm_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            llm_pb2_grpc.LlmServiceStub(channel).Generate(
                llm_pb2.GenerateRequest(model_fingerprint="0" * 16, prompt=llm_pb2.Prompt(token_ids=[1])), timeout=30)
    assert error_info(caught.value).domain == "triptych.llm"


# ---- request ids ----

def test_a_caller_given_request_id_comes_back(processor):
    request = processor_pb2.GenerateRequest(messages=build_messages("hi", []), sampling=SHORT)
    _, call = processor.Generate.with_call(request, metadata=((REQUEST_ID_KEY, "caller-id-1"),), timeout=60)
    assert _request_id(call) == "caller-id-1"


def test_a_missing_request_id_is_made_and_sent_first(processor):
    stream = processor.StreamGenerate(
        processor_pb2.StreamGenerateRequest(messages=build_messages("hi", []), sampling=SHORT), timeout=60)
    made = _request_id(stream)  # initial metadata: a streaming caller sees it before any token
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert list(stream)[-1].HasField("completion")
    _, call = processor.Generate.with_call(
        processor_pb2.GenerateRequest(messages=build_messages("hi", []), sampling=SHORT), timeout=60)
    assert _request_id(call) != made  # one per call


def test_a_failed_call_returns_its_request_id(processor):
    with pytest.raises(grpc.RpcError) as caught:
        processor.Generate(processor_pb2.GenerateRequest(), metadata=((REQUEST_ID_KEY, "failing-id"),), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _request_id(caught.value) == "failing-id"


def test_an_overlong_request_id_is_replaced(processor):
    _, call = processor.Generate.with_call(
        processor_pb2.GenerateRequest(messages=build_messages("hi", []), sampling=SHORT),
        metadata=((REQUEST_ID_KEY, "x" * 500),), timeout=60)
    assert re.fullmatch(r"[0-9a-f]{32}", _request_id(call))


def test_the_processor_passes_the_request_id_to_encoder_and_llm(processor, caplog):
    caplog.handler.addFilter(RequestIdFilter())  # as the CLI's log handler does
    with caplog.at_level(logging.INFO):
        request = processor_pb2.GenerateRequest(messages=build_messages("hi", [image_bytes(64, 64, seed=3)]),
                                                sampling=SHORT)
        processor.Generate(request, metadata=((REQUEST_ID_KEY, "joined-id-7"),), timeout=60)
    methods = {r.getMessage().split()[0] for r in caplog.records if getattr(r, "request_id", None) == "joined-id-7"}
    assert {"/triptych.processor.v1.ProcessorService/Generate", "/triptych.encoder.v1.EncoderService/StreamEncode",
            "/triptych.llm.v1.LlmService/StreamGenerate"} <= methods


# ---- reflection: v1 (what current clients ask first) and v1alpha ----

SERVICES = {"triptych.processor.v1.ProcessorService", "grpc.health.v1.Health"}


def test_reflection_v1_lists_services_and_serves_files(services):
    with grpc.insecure_channel(services.address) as channel:
        info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                     request_serializer=V1Request.SerializeToString,
                                     response_deserializer=V1Response.FromString)
        listed, found = info(iter([V1Request(list_services=""),
                                   V1Request(file_containing_symbol="triptych.processor.v1.ProcessorService")]),
                             timeout=30)
    names = {s.name for s in listed.list_services_response.service}
    assert SERVICES | {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in found.file_descriptor_response.file_descriptor_proto]
    assert "triptych/processor/v1/processor.proto" in {f.name for f in files}


def test_reflection_v1alpha_lists_services(services):
    with grpc.insecure_channel(services.address) as channel:
        stub = v1alpha_grpc.ServerReflectionStub(channel)
        reply = next(stub.ServerReflectionInfo(iter([v1alpha_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=30))
    assert SERVICES <= {s.name for s in reply.list_services_response.service}


def test_health_watch_streams_through_the_production_interceptors(services):
    """grpc's health Watch writes with context.write(); the interceptors once broke it (the pool watches it)."""
    with grpc.insecure_channel(services.encoder_address) as channel:
        call = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="triptych.encoder.v1.EncoderService"), timeout=30)
        assert next(call).status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()
