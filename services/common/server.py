"""grpc.aio bootstrap shared by the three services: interceptors, health, reflection, limits, SIGTERM,
TLS, the metrics endpoint; and the one way a service opens a channel to another (TLS, tracing).

Each service's own `services/<service>/server.py` calls `start_server` with its servicer;
the CLI, `python -m services.<service>` and the tests all go through it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterable, Sequence

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common import tracing
from services.common.config import ServerConfig
from services.common.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor, RequestIdInterceptor
from services.common.metrics import Collector, MetricsEndpoint
from services.common.reflection import add_reflection
from services.common.tls import ClientTLS, server_credentials, server_name_options

log = logging.getLogger(__name__)


HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def error_domain(service: ServiceDescriptor) -> str:
    """ErrorInfo.domain of a service: "triptych.encoder.v1.EncoderService" -> "triptych.encoder"."""
    return ".".join(service.full_name.split(".")[:2])


class Server:
    """One service's grpc.aio server: production interceptors, health and reflection, TLS when configured,
    and its metrics endpoint (with the service's `collectors`) when --metrics-port is set.

    `auth_token`: calls other than health checks must carry it (AuthInterceptor)."""

    def __init__(self, cfg: ServerConfig, service: ServiceDescriptor,
                 add_servicer: Callable[[grpc.aio.Server], None], *, collectors: Iterable[Collector] = (),
                 auth_token: bytes | None = None):
        self.cfg = cfg
        self.service_names = [service.full_name]
        self.collectors = list(collectors)
        self.metrics: MetricsEndpoint | None = None
        interceptors = [*tracing.server_interceptors(), MetricsInterceptor(), RequestIdInterceptor(),
                        ErrorInterceptor(error_domain(service))]
        if auth_token is not None:
            interceptors.append(AuthInterceptor(auth_token))
        self.grpc = grpc.aio.server(interceptors=interceptors, options=cfg.options)
        add_servicer(self.grpc)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        add_reflection(self.grpc, [*self.service_names, HEALTH_SERVICE])
        credentials = server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_ca)
        self.tls = credentials is not None
        self.port = (self.grpc.add_secure_port(cfg.listen_addr, credentials) if credentials is not None
                     else self.grpc.add_insecure_port(cfg.listen_addr))
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen_addr}")
        # Health alone, in plaintext, for probes that cannot present a certificate; same statuses.
        self.health_grpc: grpc.aio.Server | None = None
        if cfg.health_port:
            self.health_grpc = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_grpc)
            if self.health_grpc.add_insecure_port(f"{cfg.host}:{cfg.health_port}") == 0:
                raise OSError(f"cannot listen on {cfg.host}:{cfg.health_port} (--health-port)")

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.port}"

    async def start(self) -> None:
        if self.cfg.metrics_port:
            self.metrics = MetricsEndpoint(self.cfg.host, self.cfg.metrics_port, self.collectors)
        await self.grpc.start()
        if self.health_grpc is not None:
            await self.health_grpc.start()
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float | None = None, drain_s: float = 0.0) -> None:
        """Health NOT_SERVING at once; still serving for `drain_s` (probes and load balancers see NOT_SERVING
        while the listener still accepts, and route elsewhere); then stops taking new calls (UNAVAILABLE)
        and lets in-flight ones finish within the grace."""
        await self.health.enter_graceful_shutdown()  # later health.set() calls (engine restarts) are ignored
        if drain_s > 0:
            await asyncio.sleep(drain_s)
        await self.grpc.stop(self.cfg.grace_s if grace_s is None else grace_s)
        if self.health_grpc is not None:
            await self.health_grpc.stop(0)
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    async def serve_until_signal(self, name: str) -> None:
        """Runs until SIGTERM/SIGINT, then shuts down gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("%s listening on %s%s", name, self.address, " (TLS)" if self.tls else "")
        print(f"{name} listening on {self.address}", flush=True)
        waiter = asyncio.ensure_future(self.grpc.wait_for_termination())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("%s: signal received: health NOT_SERVING, draining %g s, then finishing in-flight requests "
                     "(grace %g s)", name, self.cfg.drain_s, self.cfg.grace_s)
            await self.stop(drain_s=self.cfg.drain_s)
            log.info("%s: stopped", name)
        waiter.cancel()


async def start_server(cfg: ServerConfig, service: ServiceDescriptor,
                       add_servicer: Callable[[grpc.aio.Server], None], *, collectors: Iterable[Collector] = (),
                       auth_token: bytes | None = None) -> tuple[Server, int]:
    """Builds, starts and marks SERVING one service's server; returns it and its port."""
    server = Server(cfg, service, add_servicer, collectors=collectors, auth_token=auth_token)
    await server.start()
    return server, server.port


def channel_options(max_message_mib: int = ServerConfig.max_message_mib) -> list[tuple[str, int]]:
    """Options for channels to our services: message limits as large as the servers'."""
    return ServerConfig(max_message_mib=max_message_mib).options


def open_channel(address: str, options: Sequence[tuple[str, object]] = (), *, tls: ClientTLS | None = None,
                 server_name: str | None = None) -> grpc.aio.Channel:
    """A channel from one of our services to another: TLS when `tls` is set (checking the certificate for
    `server_name` when the address dialled is not the name, e.g. a replica's IP), tracing's client
    interceptors while tracing is on."""
    interceptors = tracing.client_interceptors() or None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.credentials(), options=[*options, *server_name_options(server_name)],
                                   interceptors=interceptors)
