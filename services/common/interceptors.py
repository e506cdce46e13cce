"""The production server interceptors: metrics, request ids (and their log lines), errors -> statuses,
and the processor's optional bearer token.

Every server is built with `[MetricsInterceptor(), RequestIdInterceptor(), ErrorInterceptor(domain)]`
(+ `AuthInterceptor(token)` on a processor with a token; tracing's own interceptor goes first when on),
in that order, outermost first: every call is counted, refusals included; the request id is set before
anything of the call runs, so even the error log line of a failed call carries it; a refused token
becomes UNAUTHENTICATED through ErrorInterceptor like any other error.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc

from services.common import metrics, tracing
from services.common.errors import Internal, InvalidArgument, TriptychError, Unimplemented

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
            tracing.annotate(**{"triptych.request_id": request_id})
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


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by method and final status code, and times it (services/common/metrics.py)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        counter, timer = metrics.RPC_REQUESTS, metrics.RPC_SECONDS.labels(method)

        def end(context: grpc.aio.ServicerContext, started: float, fallback: grpc.StatusCode) -> None:
            # An abort leaves its code on the context; otherwise the call ended as `fallback` says.
            code = context.code() or fallback
            counter.labels(method, getattr(code, "name", str(code))).inc()
            timer.observe(time.perf_counter() - started)
            tracing.set_status_code(code if isinstance(code, grpc.StatusCode) else None)

        def unary(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                started, fallback = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    response = await inner(request, context)
                    fallback = grpc.StatusCode.OK
                    return response
                except (asyncio.CancelledError, GeneratorExit):
                    fallback = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    end(context, started, fallback)
            return behavior

        def stream(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                started, fallback = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    async for response in stream_responses(inner, request, context):
                        yield response
                    fallback = grpc.StatusCode.OK
                except (asyncio.CancelledError, GeneratorExit):  # the caller went away
                    fallback = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    end(context, started, fallback)
            return behavior

        return wrap_handler(handler, unary, stream)


class Unauthenticated(TriptychError):
    code = grpc.StatusCode.UNAUTHENTICATED


AUTH_TOKEN_ENV = "TRIPTYCH_AUTH_TOKEN"  # the token itself, where no --auth-token-file is given
_UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)  # probes carry no token


def load_auth_token(path: Path | None) -> bytes | None:
    """The bearer token from --auth-token-file (surrounding whitespace dropped), else TRIPTYCH_AUTH_TOKEN;
    None: no token required. Never logged."""
    if path is not None:
        try:
            token = path.read_bytes().strip()
        except OSError as err:
            raise InvalidArgument(f"--auth-token-file {path}: cannot read it ({err.strerror})",
                                  reason="AUTH_CONFIG_INVALID") from err
        if not token:
            raise InvalidArgument(f"--auth-token-file {path} is empty", reason="AUTH_CONFIG_INVALID")
        return token
    token = os.environ.get(AUTH_TOKEN_ENV, "").strip()
    return token.encode() if token else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED); health checks pass.
    Compared in constant time; neither the expected nor the sent token reaches a log line or a message."""

    def __init__(self, token: bytes):
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_UNAUTHENTICATED_METHODS):
            return handler
        refusal = self._check(handler_call_details.invocation_metadata or ())
        if refusal is None:
            return handler

        def unary(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                raise refusal
            return behavior

        def stream(inner: Behavior) -> Behavior:
            async def behavior(request, context):
                raise refusal
                yield  # an async generator, as the streaming handler expects
            return behavior

        return wrap_handler(handler, unary, stream)

    def _check(self, metadata) -> Unauthenticated | None:
        sent = next((value for key, value in metadata if key == "authorization"), None)
        if isinstance(sent, bytes):
            sent = sent.decode("latin-1")
        return bearer_refusal(sent, self._token, "this processor")


def bearer_refusal(authorization: str | None, token: bytes, service: str) -> Unauthenticated | None:
    """Why an `authorization` value (None: absent) does not carry `token`; None when it does. One check
    for the gRPC services and the HTTP front; compared in constant time, neither token in the message."""
    if authorization is None:
        return Unauthenticated(f"{service} requires a bearer token: send 'authorization: Bearer <token>' "
                               "(gRPC metadata, or the HTTP header)", reason="AUTH_TOKEN_MISSING")
    scheme, _, sent = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token):
        return Unauthenticated(f"the bearer token is not valid for {service}", reason="AUTH_TOKEN_INVALID")
    return None


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
