"""grpc.aio bootstrap shared by the three services: interceptors, health, reflection, limits, SIGTERM.

Each service's own `services/<service>/server.py` calls `start_server` with its servicer;
the CLI, `python -m services.<service>` and the tests all go through it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.config import ServerConfig
from services.common.interceptors import ErrorInterceptor, RequestIdInterceptor
from services.common.reflection import add_reflection

log = logging.getLogger(__name__)


HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def error_domain(service: ServiceDescriptor) -> str:
    """ErrorInfo.domain of a service: "triptych.encoder.v1.EncoderService" -> "triptych.encoder"."""
    return ".".join(service.full_name.split(".")[:2])


class Server:
    """One service's grpc.aio server: production interceptors, health and reflection."""

    def __init__(self, cfg: ServerConfig, service: ServiceDescriptor,
                 add_servicer: Callable[[grpc.aio.Server], None]):
        self.cfg = cfg
        self.service_names = [service.full_name]
        self.grpc = grpc.aio.server(interceptors=[RequestIdInterceptor(), ErrorInterceptor(error_domain(service))],
                                    options=cfg.options)
        add_servicer(self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        add_reflection(self.grpc, [*self.service_names, HEALTH_SERVICE])
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


async def start_server(cfg: ServerConfig, service: ServiceDescriptor,
                       add_servicer: Callable[[grpc.aio.Server], None]) -> tuple[Server, int]:
    """Builds, starts and marks SERVING one service's server; returns it and its port."""
    server = Server(cfg, service, add_servicer)
    await server.start()
    return server, server.port


def channel_options(max_message_mib: int = ServerConfig.max_message_mib) -> list[tuple[str, int]]:
    """Options for channels to our services: message limits as large as the servers'."""
    return ServerConfig(max_message_mib=max_message_mib).options
