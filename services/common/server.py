"""grpc.aio bootstrap shared by the three services: health, reflection, errors, limits, SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.config import ServerConfig
from services.common.errors import Internal, TriptychError

log = logging.getLogger(__name__)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The one place domain exceptions become gRPC statuses (with ErrorInfo details)."""

    def __init__(self, domain: str):
        self.domain = domain  # ErrorInfo.domain of errors that do not name one, e.g. "triptych.encoder"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            inner_unary = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner_unary(request, context)
                except Exception as err:  # noqa: BLE001 — every failure becomes a status
                    await _abort(context, method, err, self.domain)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except Exception as err:  # noqa: BLE001
                    await _abort(context, method, err, self.domain)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer)
        return handler


async def _abort(context: grpc.aio.ServicerContext, method: str, err: Exception, domain: str) -> None:
    if isinstance(err, grpc.aio.AbortError):
        raise err
    if not isinstance(err, TriptychError):
        log.exception("unexpected error in %s", method)
        err = Internal(f"internal error in {method}: {type(err).__name__}: {err}", reason="INTERNAL")
    else:
        log.info("%s -> %s %s: %s", method, err.code.name, err.reason, err.message)
    await context.abort_with_status(err.to_status(domain))


class Server:
    """A started grpc.aio server with health and reflection for the given services."""

    def __init__(self, cfg: ServerConfig, add_servicers: Callable[[grpc.aio.Server], None],
                 service_names: Sequence[str]):
        self.cfg = cfg
        self.service_names = list(service_names)
        # "triptych.encoder.v1.EncoderService" -> "triptych.encoder"
        domain = ".".join(self.service_names[0].split(".")[:2]) if self.service_names else "triptych"
        self.grpc = grpc.aio.server(interceptors=[ErrorInterceptor(domain)], options=cfg.options)
        add_servicers(self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.grpc)
        self.port = self.grpc.add_insecure_port(cfg.listen_addr)
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen_addr}")

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def start(self) -> None:
        await self.grpc.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops taking new calls (health NOT_SERVING), lets in-flight ones finish within the grace."""
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(self.cfg.grace_s if grace_s is None else grace_s)

    async def serve_until_signal(self, name: str) -> None:
        """Runs until SIGTERM/SIGINT, then shuts down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("%s listening on %s", name, self.address)
        print(f"{name} listening on {self.address}", flush=True)
        waiter = asyncio.ensure_future(self.grpc.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("%s: signal received, finishing in-flight requests (grace %.0f s)", name, self.cfg.grace_s)
            await self.stop()
        waiter.cancel()


def channel_options(max_message_mib: int = ServerConfig.max_message_mib) -> list[tuple[str, int]]:
    """Options for channels to our services: message limits as large as the servers'."""
    return ServerConfig(max_message_mib=max_message_mib).options
