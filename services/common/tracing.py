"""OpenTelemetry traces across the three services: off unless asked, and then one trace per request.

On with `--otel` or when the standard OTEL_TRACES_EXPORTER names an exporter (not "none"); the
exporters are OpenTelemetry's own, picked by OTEL_TRACES_EXPORTER (default "otlp": OTLP over gRPC
to OTEL_EXPORTER_OTLP_ENDPOINT, default localhost:4317; "console" prints spans), and the standard
OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_PROPAGATORS, OTEL_BSP_* apply.

When on, every server gets opentelemetry-instrumentation-grpc's grpc.aio server interceptor (a span
per call, its parent read from the caller's metadata), every channel the processor opens gets its
client interceptors (a span per outgoing call, the context written into the metadata next to
x-request-id), and the stages add their spans: media decode and the HF processor (processor), the
encoder's inputs and tower, the LLM's queue, prefill and decode loop (from the engine's timestamps).

Off (the default), `span` returns one shared no-op context manager, no interceptor is installed and
opentelemetry is not even imported: tracing costs nothing.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

_NOOP = contextlib.nullcontext()
# Calls that are not requests: orchestrators poll health, tools list services.
_UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_tracer: Any = None  # an opentelemetry Tracer while tracing is on
_provider: Any = None


def requested(otel_flag: bool) -> bool:
    """Whether tracing is asked for: the flag, or an exporter named in OTEL_TRACES_EXPORTER."""
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    return otel_flag or exporter not in ("", "none")


def setup(service_name: str, otel_flag: bool) -> bool:
    """Turns tracing on for this process if asked (see the module's doc); returns whether it is on.

    Call before building servers and channels: their interceptors are chosen when they are made.
    """
    if not requested(otel_flag):
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"triptych-{service_name}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    for exporter in _exporters():
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    enable(provider)
    log.info("tracing on: exporters %s", os.environ.get("OTEL_TRACES_EXPORTER") or "otlp")
    return True


def _exporters() -> list[Any]:
    """The span exporters OTEL_TRACES_EXPORTER names (comma-separated), as the OpenTelemetry SDK finds them."""
    from importlib.metadata import entry_points

    from services.common.errors import InvalidArgument

    names = [n.strip() for n in (os.environ.get("OTEL_TRACES_EXPORTER") or "otlp").split(",") if n.strip()]
    found = {e.name: e for e in entry_points(group="opentelemetry_traces_exporter")}
    found.setdefault("otlp", found.get("otlp_proto_grpc"))
    exporters = []
    for name in names:
        if name == "none":
            continue
        if found.get(name) is None:
            known = ", ".join(sorted(n for n, e in found.items() if e is not None))
            raise InvalidArgument(f"OTEL_TRACES_EXPORTER names {name!r}, which is not installed (installed: {known})",
                                  reason="TRACING_CONFIG_INVALID")
        exporters.append(found[name].load()())
    return exporters


def enable(provider: Any) -> None:
    """Traces with `provider` (a TracerProvider; tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    from opentelemetry import trace

    _provider = provider
    _tracer = trace.get_tracer("triptych", tracer_provider=provider)


def disable() -> None:
    """Back to no tracing for servers and channels made from now on."""
    global _tracer, _provider
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: Any):
    """A child span of the current one around a stage; a no-op while tracing is off."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes or None)


def traced(name: str) -> Callable[[F], F]:
    """Decorates a (blocking) function with `span(name)`."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with span(name):
                return fn(*args, **kwargs)
        return inner  # type: ignore[return-value]
    return wrap


def record_span(name: str, start_ns: int, end_ns: int, **attributes: Any) -> None:
    """A finished child span of the current one, from timestamps taken elsewhere (the LLM's engine
    process: time.time_ns() there is the same clock)."""
    if _tracer is None or not start_ns or end_ns < start_ns:
        return
    _tracer.start_span(name, start_time=start_ns, attributes=attributes or None).end(end_time=end_ns)


def annotate(**attributes: Any) -> None:
    """Sets attributes (e.g. the request id) on the current span."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    for key, value in attributes.items():
        current.set_attribute(key, value)


def set_status_code(code: Any) -> None:
    """Marks the current (server) span with a call's gRPC status (an abort_with_status the
    instrumentation does not see)."""
    if _tracer is None or code is None or code.name == "OK":
        return
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode

    current = trace.get_current_span()
    current.set_attribute("rpc.grpc.status_code", code.value[0])
    current.set_status(Status(StatusCode.ERROR, code.name))


def _traced_call(details: Any) -> bool:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    return not method.startswith(_UNTRACED)


def server_interceptors() -> list:
    """The grpc.aio server interceptor (first in the server's list: outermost), or none when off."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=_provider, filter_=_traced_call)]


def client_interceptors() -> list:
    """The grpc.aio client interceptors for a channel, or none when off."""
    if _tracer is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(tracer_provider=_provider, filter_=_traced_call)
