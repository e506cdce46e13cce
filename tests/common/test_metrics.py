"""Metrics, the bearer token and TLS settings without a model: the interceptors on a real grpc.aio server
(a servicer with no methods: every call is UNIMPLEMENTED), the collectors on fake counters."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.common import metrics
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import ServerConfig
from services.common.errors import InvalidArgument, error_info
from services.common.interceptors import load_auth_token
from services.common.server import start_server
from services.common.tls import ClientTLS, server_credentials
from services.encoder.batcher import BatchCounters
from services.encoder.cache import CacheCounters

ENCODER = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]
GET_MODEL_INFO = "/triptych.encoder.v1.EncoderService/GetModelInfo"


def samples(collector) -> dict[tuple[str, frozenset], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_encoder_batch_sizes_are_an_exact_histogram_of_the_log2_counts():
    batches = BatchCounters(forwards=6, items=1 + 1 + 2 + 3 + 9 + 12, forwards_by_items_log2=[2, 2, 0, 2])
    servicer = SimpleNamespace(cache=SimpleNamespace(counters=CacheCounters(hits=5, misses=2, evictions=1),
                                                     used_bytes=100, capacity_bytes=1000),
                               batcher=SimpleNamespace(counters=batches, queued_items=4))
    got = samples(metrics.EncoderCollector(servicer))
    bucket = {dict(labels)["le"]: v for (name, labels), v in got.items() if name == "triptych_encoder_batch_items_bucket"}
    assert bucket == {"1.0": 2, "3.0": 4, "7.0": 4, "15.0": 6, "+Inf": 6}
    assert got[("triptych_encoder_batch_items_sum", frozenset())] == 28
    assert got[("triptych_encoder_cache_hits_total", frozenset())] == 5
    assert got[("triptych_encoder_cache_evictions_total", frozenset())] == 1
    assert got[("triptych_encoder_queue_items", frozenset())] == 4


def test_pool_collector_labels_each_replica():
    stats = [SimpleNamespace(address="10.0.0.1:1", healthy=True, outstanding_items=2, calls=5, items=7, failures=0,
                             ejections=0, references=3, reference_misses=1),
             SimpleNamespace(address="10.0.0.2:1", healthy=False, outstanding_items=0, calls=1, items=1, failures=1,
                             ejections=1, references=0, reference_misses=0)]
    got = samples(metrics.PoolCollector(SimpleNamespace(stats=lambda: stats)))
    assert got[("triptych_encoder_replica_healthy", frozenset({("replica", "10.0.0.1:1")}))] == 1
    assert got[("triptych_encoder_replica_healthy", frozenset({("replica", "10.0.0.2:1")}))] == 0
    assert got[("triptych_encoder_replica_failures_total", frozenset({("replica", "10.0.0.2:1")}))] == 1


def test_llm_gauges_move_a_request_from_waiting_to_running_and_out():
    waiting, running = metrics.LLM_WAITING._value.get(), metrics.LLM_RUNNING._value.get()
    first, second = metrics.LlmRequestGauges(10), metrics.LlmRequestGauges(10)
    assert metrics.LLM_WAITING._value.get() == waiting + 2
    first.token()
    first.token()
    assert (metrics.LLM_WAITING._value.get(), metrics.LLM_RUNNING._value.get()) == (waiting + 1, running + 1)
    first.close()
    first.close()  # once only
    second.close()  # abandoned while waiting
    assert (metrics.LLM_WAITING._value.get(), metrics.LLM_RUNNING._value.get()) == (waiting, running)


def _count(method: str, code: str) -> float:
    return metrics.RPC_REQUESTS.labels(method, code)._value.get()


def _serve(token: bytes | None):
    """An encoder server whose servicer implements nothing, with the production interceptors."""
    loop = asyncio.new_event_loop()
    server, port = loop.run_until_complete(start_server(
        ServerConfig(port=0), ENCODER,
        lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(encoder_pb2_grpc.EncoderServiceServicer(), s),
        auth_token=token))
    return loop, server, f"127.0.0.1:{port}"


def _call(address: str, metadata=()) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            encoder_pb2_grpc.EncoderServiceStub(channel).GetModelInfo(encoder_pb2.GetModelInfoRequest(),
                                                                      metadata=metadata, timeout=10)
    return failed.value


def _in_thread(loop, fn):
    """Runs the blocking client `fn` while the server's loop runs."""
    return loop.run_until_complete(loop.run_in_executor(None, fn))


def test_calls_are_counted_by_method_and_code_and_the_token_is_checked():
    loop, server, address = _serve(b"s3cret")
    try:
        before = {code: _count(GET_MODEL_INFO, code) for code in ("UNAUTHENTICATED", "UNIMPLEMENTED")}
        missing = _in_thread(loop, lambda: _call(address))
        wrong = _in_thread(loop, lambda: _call(address, (("authorization", "Bearer s3cre"),)))
        wrong_scheme = _in_thread(loop, lambda: _call(address, (("authorization", "Basic s3cret"),)))
        right = _in_thread(loop, lambda: _call(address, (("authorization", "Bearer s3cret"),)))

        def health():
            with grpc.insecure_channel(address) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)

        assert _in_thread(loop, health).status == health_pb2.HealthCheckResponse.SERVING  # no token needed
    finally:
        loop.run_until_complete(server.stop(0))
        loop.close()
    assert [error_info(e).reason for e in (missing, wrong, wrong_scheme)] == [
        "AUTH_TOKEN_MISSING", "AUTH_TOKEN_INVALID", "AUTH_TOKEN_INVALID"]
    assert all(e.code() == grpc.StatusCode.UNAUTHENTICATED for e in (missing, wrong, wrong_scheme))
    assert right.code() == grpc.StatusCode.UNIMPLEMENTED  # past the token: the servicer's own answer
    assert _count(GET_MODEL_INFO, "UNAUTHENTICATED") == before["UNAUTHENTICATED"] + 3
    assert _count(GET_MODEL_INFO, "UNIMPLEMENTED") == before["UNIMPLEMENTED"] + 1


def test_auth_token_from_file_or_env(tmp_path, monkeypatch):
    monkeypatch.delenv("TRIPTYCH_AUTH_TOKEN", raising=False)
    assert load_auth_token(None) is None
    monkeypatch.setenv("TRIPTYCH_AUTH_TOKEN", "from-env")
    assert load_auth_token(None) == b"from-env"
    path = tmp_path / "token"
    path.write_text("  from-file\n")
    assert load_auth_token(path) == b"from-file"  # the file wins
    path.write_text("\n")
    with pytest.raises(InvalidArgument) as empty:
        load_auth_token(path)
    assert empty.value.reason == "AUTH_CONFIG_INVALID" and "from-env" not in empty.value.message
    with pytest.raises(InvalidArgument):
        load_auth_token(tmp_path / "missing")


def test_tls_settings_are_checked_at_start(tmp_path):
    not_pem = tmp_path / "cert.txt"
    not_pem.write_text("hello")
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    cases = [
        lambda: server_credentials(pem, None, None),  # a certificate without its key
        lambda: server_credentials(None, None, pem),  # client CA on a plaintext server
        lambda: server_credentials(not_pem, pem, None),
        lambda: server_credentials(tmp_path / "missing.pem", pem, None),
        lambda: ClientTLS.from_files(None, None, pem),
    ]
    for case in cases:
        with pytest.raises(InvalidArgument) as bad:
            case()
        assert bad.value.reason == "TLS_CONFIG_INVALID"
    assert server_credentials(None, None, None) is None
    assert ClientTLS.from_files(None, None, None) is None
    assert ClientTLS.from_files(None, None, None, enabled=True) == ClientTLS()  # TLS with the system's roots


def test_the_endpoint_serves_metrics_and_a_taken_port_is_a_clear_error():
    import urllib.request

    from services.common.errors import FailedPrecondition

    endpoint = metrics.MetricsEndpoint("127.0.0.1", 0)
    try:
        page = urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10).read().decode()
        assert "# TYPE triptych_rpc_requests_total counter" in page
        with pytest.raises(FailedPrecondition) as taken:
            metrics.MetricsEndpoint("127.0.0.1", endpoint.port)
        assert taken.value.reason == "METRICS_PORT_UNAVAILABLE"
    finally:
        endpoint.close()
