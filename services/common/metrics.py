"""Prometheus metrics of the three services, all defined here, served over HTTP on --metrics-port.

Each service process exports what it knows (one registry per process, prometheus-client's default):

- every service: `triptych_rpc_requests_total{method,code}` and `triptych_rpc_duration_seconds{method}`
  (MetricsInterceptor, one count per call, refusals included);
- processor and LLM: `triptych_time_to_first_token_seconds` and `triptych_time_per_output_token_seconds`
  (TokenTimer; the processor's include media decoding and encoding, the LLM's start at its request);
- LLM: `triptych_llm_requests_waiting` (the queue: admitted, no token yet) and `triptych_llm_requests_running`
  (the running batch: prefilled, not finished), prompt and generated token counters. The engine runs in a
  child process; its token events already cross to the service, and a request's first token is the end of
  its prefill, so the service counts both from those events (no second channel, no multiprocess registry);
- encoder: items per tower forward (`triptych_encoder_batch_items`), the embedding cache's
  hits/misses/evictions and bytes, the batcher's queue (`triptych_encoder_queue_items`, what an
  autoscaler watches), read from the counters GetStats reports when Prometheus scrapes (EncoderCollector);
- processor: each encoder replica's health and counters (PoolCollector, from EncoderPool.stats());
- front: `triptych_http_requests_total{route,status}` and `triptych_http_request_duration_seconds{route}`
  (the front's RequestIds middleware, refusals included);
- `triptych_tensor_bytes_sent_total{link}`: the bytes of the tensors (and media files) a message carries,
  whatever their transport (inline, chunks, shared memory), for link encoder_request (processor ->
  encoder), encoder_reply (encoder -> processor) and llm_request (processor -> LLM).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger(__name__)

# Latency buckets from a tiny CPU model's few milliseconds to a large image's tens of seconds.
_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

RPC_REQUESTS = Counter("triptych_rpc_requests", "gRPC calls served, by full method name and status code",
                       ["method", "code"])
RPC_SECONDS = Histogram("triptych_rpc_duration_seconds", "gRPC call duration, start to status, seconds",
                        ["method"], buckets=_SECONDS)
TTFT = Histogram("triptych_time_to_first_token_seconds",
                 "seconds from a generation request's arrival to its first generated token", buckets=_SECONDS)
TPOT = Histogram("triptych_time_per_output_token_seconds",
                 "seconds per generated token after the first, one observation per request of 2+ tokens",
                 buckets=_TOKEN_SECONDS)
LLM_WAITING = Gauge("triptych_llm_requests_waiting", "LLM requests admitted and not yet prefilled (the queue)")
LLM_RUNNING = Gauge("triptych_llm_requests_running", "LLM requests prefilled and decoding (the running batch)")
LLM_PROMPT_TOKENS = Counter("triptych_llm_prompt_tokens", "prompt tokens of LLM requests admitted")
LLM_GENERATED_TOKENS = Counter("triptych_llm_generated_tokens", "tokens the LLM generated")
HTTP_REQUESTS = Counter("triptych_http_requests", "HTTP requests the front answered, by route and status",
                        ["route", "status"])
HTTP_SECONDS = Histogram("triptych_http_request_duration_seconds",
                         "HTTP request duration, arrival to the last byte sent, seconds", ["route"], buckets=_SECONDS)
TENSOR_BYTES = Counter("triptych_tensor_bytes_sent",
                       "bytes of tensors (and media files) sent, whatever the transport, by link", ["link"])
# The three links, by the service that sends them.
ENCODER_REQUEST, ENCODER_REPLY, LLM_REQUEST = "encoder_request", "encoder_reply", "llm_request"


class TokenTimer:
    """One generation's time to first token and time per output token, observed as its tokens arrive."""

    def __init__(self, started: float | None = None):
        self.started = time.perf_counter() if started is None else started
        self.first: float | None = None
        self.tokens = 0

    def tokens_arrived(self, count: int) -> None:
        if count and self.first is None:
            self.first = time.perf_counter()
            TTFT.observe(self.first - self.started)
        self.tokens += count

    def finished(self) -> None:
        """The generation ended normally (a failed or cancelled one observes no time per token)."""
        if self.first is not None and self.tokens > 1:
            TPOT.observe((time.perf_counter() - self.first) / (self.tokens - 1))


class LlmRequestGauges:
    """One LLM request in the waiting and running gauges: waiting until its first token, running until it
    ends (finished, failed or abandoned by its caller)."""

    def __init__(self, prompt_tokens: int):
        LLM_PROMPT_TOKENS.inc(prompt_tokens)
        LLM_WAITING.inc()
        self.state: Gauge | None = LLM_WAITING

    def token(self) -> None:
        LLM_GENERATED_TOKENS.inc()
        if self.state is LLM_WAITING:
            LLM_WAITING.dec()
            LLM_RUNNING.inc()
            self.state = LLM_RUNNING

    def close(self) -> None:
        if self.state is not None:
            self.state.dec()
            self.state = None


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """prod(shape) * dtype size of Tensor protos, read from their shapes (reading `data` would copy it)."""
    from services.common.tensors import num_bytes

    return sum(num_bytes(t) for t in tensors)


def count_sent(link: str, num_bytes: int) -> None:
    TENSOR_BYTES.labels(link).inc(num_bytes)


# ---- read at scrape time from the services' own counters ---------------------------------------------
class EncoderCollector(Collector):
    """The encoder's cache and batcher, as GetStats reports them (no work on the request path)."""

    def __init__(self, servicer: Any):
        self.servicer = servicer  # services.encoder.servicer.EncoderServicer

    def collect(self) -> Iterator:
        cache, counters, batches = self.servicer.cache, self.servicer.cache.counters, self.servicer.batcher.counters
        for name, value, text in (
                ("hits", counters.hits, "items served from the embedding cache"),
                ("misses", counters.misses, "items encoded because the cache did not hold them"),
                ("evictions", counters.evictions, "items evicted from the cache to make room"),
                ("single_flight_joins", counters.single_flight_joins, "items that joined an identical encoding "
                                                                       "in flight"),
                ("reference_misses", counters.reference_misses, "cache references the cache no longer held")):
            yield CounterMetricFamily(f"triptych_encoder_cache_{name}", text, value=value)
        yield GaugeMetricFamily("triptych_encoder_cache_bytes", "bytes of embeddings in the cache", value=cache.used_bytes)
        yield GaugeMetricFamily("triptych_encoder_cache_capacity_bytes", "the cache's budget (--cache-mib)",
                                value=cache.capacity_bytes)
        yield GaugeMetricFamily("triptych_encoder_queue_items", "items waiting for the tower (not yet in a forward)",
                                value=self.servicer.batcher.queued_items)
        # forwards_by_items_log2[b] counts forwards of 2**b to 2**(b+1) - 1 items: exact cumulative buckets.
        buckets, total = [], 0
        for b, count in enumerate(batches.forwards_by_items_log2):
            total += count
            buckets.append((floatToGoString(2 ** (b + 1) - 1), total))
        buckets.append(("+Inf", batches.forwards))
        yield HistogramMetricFamily("triptych_encoder_batch_items", "items per tower forward (the batch size)",
                                    buckets=buckets, sum_value=batches.items)


class PoolCollector(Collector):
    """The processor's encoder replicas (services/processor/pool.py ReplicaStats), labelled by address."""

    def __init__(self, pool: Any):
        self.pool = pool  # services.processor.pool.EncoderPool

    def collect(self) -> Iterator:
        stats = self.pool.stats()
        gauges = {
            "healthy": ("1 while the replica takes traffic (SERVING and checked), else 0", lambda s: int(s.healthy)),
            "outstanding_items": ("items in the replica's Encode calls in flight", lambda s: s.outstanding_items),
        }
        counters = {
            "calls": "Encode calls sent to the replica", "items": "items in them",
            "failures": "calls that failed", "ejections": "times the replica was taken out of routing",
            "references": "items sent as cache references", "reference_misses": "of those, the ones it no longer held",
        }
        for name, (text, value) in gauges.items():
            family = GaugeMetricFamily(f"triptych_encoder_replica_{name}", text, labels=["replica"])
            for s in stats:
                family.add_metric([s.address], value(s))
            yield family
        for name, text in counters.items():
            family = CounterMetricFamily(f"triptych_encoder_replica_{name}", text, labels=["replica"])
            for s in stats:
                family.add_metric([s.address], getattr(s, name))
            yield family


class MetricsEndpoint:
    """The /metrics HTTP server of one service process, with the collectors it added."""

    def __init__(self, host: str, port: int, collectors: Iterable[Collector] = ()):
        try:
            self.server, self.thread = start_http_server(port, addr=host)
        except OSError as err:
            from services.common.errors import FailedPrecondition

            raise FailedPrecondition(f"--metrics-port {port}: cannot listen on {host}:{port} ({err.strerror})",
                                     reason="METRICS_PORT_UNAVAILABLE") from err
        self.collectors = list(collectors)
        for collector in self.collectors:
            REGISTRY.register(collector)
        self.port = self.server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for collector in self.collectors:
            REGISTRY.unregister(collector)
