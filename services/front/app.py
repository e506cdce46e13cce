"""The front's FastAPI application: OpenAI's chat completions and models routes, and health.

Every request is one processor call (Generate, or StreamGenerate for `stream: true`), made with
the request's id (the caller's `x-request-id` header, or a new one; returned as a header and
written in every log line, the processor's included). A stream waits for the processor's first
event before it answers, so an error found before any token (a bad image, a bad parameter) is an
HTTP error with its status, not a 200 followed by an error event. A client that disconnects
cancels the processor call, which aborts the LLM request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from starlette.exceptions import HTTPException

from services.common import metrics
from services.common.api.triptych.common.v1 import model_info_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import NotFound, TriptychError, Unavailable
from services.common.interceptors import (
    MAX_REQUEST_ID_CHARS,
    REQUEST_ID_KEY,
    bearer_refusal,
    bind_request_id,
    outgoing_metadata,
)
from services.front import convert
from services.front.errors import DOMAIN, ApiError, from_domain, from_rpc, invalid_request
from services.front.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
PROCESSOR_SERVICE = processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"].full_name
READY_TIMEOUT_S = 2.0  # a readiness probe's own budget is a few seconds
HEALTH_ROUTES = ("/health", "/health/ready")  # probes send no token
# Metric labels: the routes, not the paths (a client's unknown paths must not grow the label set).
_ROUTES = (*HEALTH_ROUTES, "/v1/models", "/v1/chat/completions")


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


@dataclass
class Backend:
    """The processor, as the front calls it."""

    address: str
    channel: grpc.aio.Channel
    model_name: str  # what clients send as `model`
    model_info: model_info_pb2.ModelInfo
    created: int  # unix seconds the front started: GET /v1/models' `created`
    token_metadata: tuple[tuple[str, str], ...] = ()  # the processor's bearer token, when it wants one
    draining: bool = False  # SIGTERM received: /health/ready says 503 while requests are still served

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every processor call carries: this request's id, and the token."""
        return (*outgoing_metadata(), *self.token_metadata)

    @property
    def stub(self) -> processor_pb2_grpc.ProcessorServiceStub:
        return processor_pb2_grpc.ProcessorServiceStub(self.channel)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise NotFound(f"the model {name!r} is not served here; this server serves {self.model_name!r} "
                           "(GET /v1/models)", reason="MODEL_NAME_UNKNOWN", domain=DOMAIN,
                           metadata={"servedModelName": self.model_name, "param": "model"})

    def card(self) -> ModelCard:
        return ModelCard(id=self.model_name, created=self.created, root=self.model_info.model_path,
                         max_model_len=self.model_info.max_context_tokens)


class RequestIds:
    """ASGI middleware: binds each request's id for its log lines and the processor call, returns it as a
    header, and logs one line per request (health probes at DEBUG)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(REQUEST_ID_KEY.encode(), b"").decode("latin-1")
        request_id = given if 0 < len(given) <= MAX_REQUEST_ID_CHARS else uuid.uuid4().hex
        bind_request_id(request_id)  # this request's own task: no reset needed
        scope.setdefault("state", {})["request_id"] = request_id
        started, status = time.perf_counter(), [0]

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (REQUEST_ID_KEY.encode(), request_id.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            seconds = time.perf_counter() - started
            level = logging.DEBUG if scope["path"].startswith("/health") else logging.INFO
            log.log(level, "%s %s %s %.1f ms", scope["method"], scope["path"], status[0] or "-", seconds * 1e3)
            route = _route(scope["path"])
            metrics.HTTP_REQUESTS.labels(route, str(status[0] or 499)).inc()
            metrics.HTTP_SECONDS.labels(route).observe(seconds)


def _route(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    return path if path in _ROUTES else "other"


class BearerAuth:
    """ASGI middleware: every request but the health probes must carry `Authorization: Bearer <token>`
    (what OpenAI clients send as their api_key); else 401 in OpenAI's error shape. The check is the
    gRPC services' (bearer_refusal): constant time, no token in a message or a log line."""

    def __init__(self, app, token: bytes):
        self.app, self._token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in HEALTH_ROUTES:
            return await self.app(scope, receive, send)
        sent = dict(scope["headers"]).get(b"authorization")
        refusal = bearer_refusal(sent.decode("latin-1") if sent is not None else None, self._token, "this server")
        if refusal is None:
            return await self.app(scope, receive, send)
        response = from_domain(refusal).response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (or the response is complete): the body is already read, so
    the next ASGI message is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T], call: grpc.aio.Call) -> T:
    """`work`'s result; if the client disconnects first, cancels the gRPC `call` and raises ClientGone."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        call.cancel()
        task.cancel()
        raise ClientGone()
    finally:
        watcher.cancel()


def create_app(backend: Backend, auth_token: bytes | None = None) -> FastAPI:
    """The application; with `auth_token`, requests other than health probes must carry it."""
    app = FastAPI(title="Triptych OpenAI-compatible API", docs_url=None, redoc_url=None)
    if auth_token is not None:
        app.add_middleware(BearerAuth, token=auth_token)
    app.add_middleware(RequestIds)  # added last: the outermost, so refusals get an id and a log line too

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(TriptychError)
    async def domain_error(request: Request, err: TriptychError) -> JSONResponse:
        return from_domain(err).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first["loc"] if x != "body") or None
        message = f"{where}: {first['msg']}" if where else first["msg"]
        return from_domain(invalid_request(message, where)).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return ApiError(err.status_code, str(err.detail), None).response()

    @app.get("/health")
    async def health() -> dict:
        """Liveness: the front answers. Readiness (the processor too): /health/ready."""
        return {"status": "ok"}

    @app.get("/health/ready")
    async def ready() -> dict:
        if backend.draining:
            raise from_domain(Unavailable("the front is shutting down (SIGTERM): send requests to another replica",
                                          reason="FRONT_SHUTTING_DOWN", domain=DOMAIN, retry_delay_s=1.0))
        stub = health_pb2_grpc.HealthStub(backend.channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=PROCESSOR_SERVICE), timeout=READY_TIMEOUT_S)
        except grpc.aio.AioRpcError as err:
            raise from_rpc(err, backend.address) from err
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise ApiError(503, f"the processor at {backend.address} is {status}", "PROCESSOR_UNAVAILABLE",
                           retry_after_s=1.0)
        return {"status": "ready", "processor": backend.address}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[backend.card()])

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> ModelCard:
        backend.check_model(name)
        return backend.card()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        backend.check_model(body.model)
        grpc_request = convert.generate_request(body)
        reply_id, created = f"chatcmpl-{request.state.request_id}", int(time.time())
        try:
            if body.stream:
                return await _stream(request, body, grpc_request, reply_id, created)
            call = backend.stub.Generate(grpc_request, metadata=backend.metadata())
            completion = (await _unless_disconnected(request, call, call)).completion
        except grpc.aio.AioRpcError as err:
            raise from_rpc(err, backend.address) from err
        except ClientGone:
            log.info("client disconnected; processor call cancelled")
            return Response(status_code=499)
        choice = Choice(message=AssistantMessage(content=completion.text),
                        logprobs=convert.logprobs(completion.logprobs),
                        finish_reason=convert.FINISH_REASONS.get(completion.finish_reason, "stop"),
                        token_ids=list(completion.token_ids) if body.return_token_ids else None)
        reply = ChatCompletion(id=reply_id, created=created, model=backend.model_name, choices=[choice],
                               usage=convert.usage(completion))
        return JSONResponse(reply.model_dump())

    async def _stream(request: Request, body: ChatCompletionRequest, grpc_request: processor_pb2.GenerateRequest,
                      reply_id: str, created: int) -> StreamingResponse:
        call = backend.stub.StreamGenerate(processor_pb2.StreamGenerateRequest(
            messages=grpc_request.messages, sampling=grpc_request.sampling), metadata=backend.metadata())
        first = await _unless_disconnected(request, call.read(), call)  # raises AioRpcError before any byte is sent
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(choices: list[ChunkChoice], usage=None) -> str:
            data = ChatCompletionChunk(id=reply_id, created=created, model=backend.model_name, choices=choices,
                                       usage=usage)
            return f"data: {data.model_dump_json()}\n\n"

        async def events() -> AsyncIterator[str]:
            event = first
            try:
                yield chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
                while event is not grpc.aio.EOF:
                    if event.HasField("completion"):
                        completion = event.completion
                        finish = convert.FINISH_REASONS.get(completion.finish_reason, "stop")
                        yield chunk([ChunkChoice(delta=Delta(), finish_reason=finish)])
                        if include_usage:  # OpenAI's last chunk: no choices, the usage
                            yield chunk([], usage=convert.usage(completion))
                    elif event.text_delta or (event.token_ids and (body.logprobs or body.return_token_ids)):
                        yield chunk([ChunkChoice(delta=Delta(content=event.text_delta),
                                                 logprobs=convert.logprobs(event.logprobs),
                                                 token_ids=list(event.token_ids) if body.return_token_ids else None)])
                    event = await call.read()
            except grpc.aio.AioRpcError as err:  # after the 200: the error as an event, as vLLM sends it
                failure = from_rpc(err, backend.address)
                error = ErrorResponse(error=ErrorBody(message=failure.message, type="server_error",
                                                      param=failure.param, code=failure.code))
                yield f"data: {error.model_dump_json()}\n\n"
            finally:
                call.cancel()  # a no-op once the call is done; else (client gone) it aborts the LLM request
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
