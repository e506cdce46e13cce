"""The production server interceptors: request ids (and their log lines) and errors -> statuses.

Every server is built with `[RequestIdInterceptor(), ErrorInterceptor(domain)]`, in that
order: the request id is set before anything of the call runs, so even the error log
line of a failed call carries it.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import Callable

import grpc

from services.common.errors import Internal, TriptychError, Unimplemented

log = logging.getLogger(__name__)

REQUEST_ID_KEY = "x-request-id"
MAX_REQUEST_ID_CHARS = 128  # a longer caller id is replaced, so a log line stays a log line
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s [%(request_id)s] %(message)s"

# The id of the call this task serves; "-" outside calls (start-up, shutdown).
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

Behavior = Callable  # (request or request iterator, context) -> response or response iterator


def bind_request_id(request_id: str) -> None:
    """Makes `request_id` the current task's id (each gRPC call runs in its own task)."""
    _request_id.set(request_id)


def current_request_id() -> str | None:
    value = _request_id.get()
    return None if value == "-" else value


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata for a call to another service made on behalf of the current call."""
    request_id = current_request_id()
    return ((REQUEST_ID_KEY, request_id),) if request_id else ()


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every log record, so the three services' logs join on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get()
        return True


def setup_logging(level: int = logging.INFO) -> None:
    """Root logging for a service process: one line per record, with the request id."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)


async def stream_responses(inner: Behavior, request, context):
    """A streaming behavior's responses: an async generator's, or none from a coroutine that writes
    them itself with context.write() (grpc's own health Watch does)."""
    result = inner(request, context)
    if inspect.isawaitable(result):
        await result
        return
    async for response in result:
        yield response


def wrap_handler(handler: grpc.RpcMethodHandler, unary: Callable[[Behavior], Behavior],
                 stream: Callable[[Behavior], Behavior]) -> grpc.RpcMethodHandler:
    """The same handler with its behavior wrapped: `unary` for one response, `stream` for many."""
    make = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, stream),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, stream),
    }
    for kind, (build, wrap) in make.items():
        behavior = getattr(handler, kind)
        if behavior is not None:
            return build(wrap(behavior), handler.request_deserializer, handler.response_serializer)
    return handler


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Takes the caller's x-request-id (or makes one), sets it for the call's log lines and
    downstream calls, sends it back first thing in the initial metadata, and logs the call."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        given = dict(handler_call_details.invocation_metadata or ()).get(REQUEST_ID_KEY, "")
        request_id = given if 0 < len(given) <= MAX_REQUEST_ID_CHARS else uuid.uuid4().hex
        # Health checks and reflection (polled by orchestrators) log only at DEBUG.
        level = logging.DEBUG if method.startswith("/grpc.") else logging.INFO

        async def begin(context: grpc.aio.ServicerContext) -> float:
            bind_request_id(request_id)  # the call's own task and context: no reset needed
            await context.send_initial_metadata(((REQUEST_ID_KEY, request_id),))
            return time.perf_counter()

        def end(context: grpc.aio.ServicerContext, started: float) -> None:
            code = context.code() or grpc.StatusCode.OK
            log.log(level, "%s %s %.1f ms", method, getattr(code, "name", code), (time.perf_counter() - started) * 1e3)

        def unary(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                started = await begin(context)
                try:
                    return await inner(request, context)
                finally:
                    end(context, started)
            return behavior

        def stream(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                started = await begin(context)
                try:
                    async for response in stream_responses(inner, request, context):
                        yield response
                finally:
                    end(context, started)
            return behavior

        return wrap_handler(handler, unary, stream)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place domain exceptions become gRPC statuses (with ErrorInfo details)."""

    def __init__(self, domain: str):
        self.domain = domain  # ErrorInfo.domain of errors that do not name one, e.g. "triptych.encoder"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method, domain = handler_call_details.method, self.domain

        def unary(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                try:
                    return await inner(request, context)
                except Exception as err:  # noqa: BLE001 — every failure becomes a status
                    await _abort(context, method, err, domain)
            return behavior

        def stream(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                try:
                    async for response in stream_responses(inner, request, context):
                        yield response
                except Exception as err:  # noqa: BLE001
                    await _abort(context, method, err, domain)
            return behavior

        return wrap_handler(handler, unary, stream)


async def _abort(context: grpc.aio.ServicerContext, method: str, err: Exception, domain: str) -> None:
    if isinstance(err, grpc.aio.AbortError):
        raise err
    if isinstance(err, NotImplementedError):  # a generated servicer's default for a method it lacks
        err = Unimplemented(f"{method} is not implemented by this server", reason="METHOD_NOT_IMPLEMENTED")
    if not isinstance(err, TriptychError):
        log.exception("unexpected error in %s", method)
        err = Internal(f"internal error in {method}: {type(err).__name__}: {err}", reason="INTERNAL")
    else:
        log.info("%s -> %s %s: %s", method, err.code.name, err.reason, err.message)
    await context.abort_with_status(err.to_status(domain))
