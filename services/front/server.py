"""The front's process: asks the processor which model it serves, then serves HTTP (HTTPS with
--tls-cert) with uvicorn until SIGTERM/SIGINT, letting in-flight requests (streams included) finish
within --grace-s. It is the processor's client as `triptych generate` is: TLS and a bearer token
when the processor wants them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import time

import grpc
import uvicorn

from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.config import FrontConfig
from services.common.errors import Unavailable
from services.common.interceptors import load_auth_token
from services.common.metrics import MetricsEndpoint
from services.common.server import channel_options
from services.common.tls import ClientTLS, server_credentials
from services.front.app import Backend, create_app
from services.front.errors import DOMAIN

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn's server with our signal handling: uvicorn's own raises the signal again once it has
    stopped, which would end the process with the signal's status instead of 0."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def connect(cfg: FrontConfig) -> Backend:
    """The processor's channel and model; UNAVAILABLE PROCESSOR_UNAVAILABLE if it does not answer in time."""
    tls = ClientTLS.from_files(cfg.tls_upstream_ca, cfg.tls_client_cert, cfg.tls_client_key,
                               flags=("--tls-upstream-ca", "--tls-client-cert", "--tls-client-key"))
    token = load_auth_token(cfg.upstream_auth_token_file)
    token_metadata = (("authorization", "Bearer " + token.decode()),) if token else ()
    options = channel_options(cfg.max_message_mib)
    channel = (grpc.aio.insecure_channel(cfg.processor_addr, options=options) if tls is None else
               grpc.aio.secure_channel(cfg.processor_addr, tls.credentials(), options=options))
    stub = processor_pb2_grpc.ProcessorServiceStub(channel)
    print(f"front: waiting for the processor at {cfg.processor_addr} (up to {cfg.connect_timeout_s:g} s)",
          file=sys.stderr, flush=True)
    try:
        reply = await stub.GetModelInfo(processor_pb2.GetModelInfoRequest(), timeout=cfg.connect_timeout_s,
                                        wait_for_ready=True, metadata=token_metadata)
    except grpc.aio.AioRpcError as err:
        await channel.close()
        raise Unavailable(f"the processor at {cfg.processor_addr} did not answer within {cfg.connect_timeout_s:g} s "
                          f"({err.code().name}: {err.details()})", reason="PROCESSOR_UNAVAILABLE",
                          domain=DOMAIN) from err
    info = reply.model_info
    return Backend(address=cfg.processor_addr, channel=channel, model_name=cfg.served_model_name or info.model_path,
                   model_info=info, created=int(time.time()), token_metadata=token_metadata)


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here: uvicorn would exit the process on a port it cannot take."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise OSError(f"front: cannot listen on {host}:{port}: {err.strerror or err}") from err
    return sock


def _https(cfg: FrontConfig) -> dict:
    """uvicorn's ssl settings from --tls-cert/--tls-key/--tls-ca; {}: plain HTTP. The files are checked as
    the gRPC services check theirs (the same TLS_CONFIG_INVALID errors), before uvicorn reads them."""
    if server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) is None:
        return {}
    settings = {"ssl_certfile": str(cfg.tls_cert), "ssl_keyfile": str(cfg.tls_key)}
    if cfg.tls_ca is not None:
        settings |= {"ssl_ca_certs": str(cfg.tls_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return settings


async def serve(cfg: FrontConfig) -> None:
    https = _https(cfg)
    auth_token = load_auth_token(cfg.auth_token_file)
    sock = _listen(cfg.host, cfg.port)
    backend = await connect(cfg)
    metrics = MetricsEndpoint(cfg.host, cfg.metrics_port) if cfg.metrics_port else None
    config = uvicorn.Config(create_app(backend, auth_token), log_config=None, access_log=False,
                            timeout_graceful_shutdown=cfg.grace_s, lifespan="off", **https)
    server = _Server(config)
    loop = asyncio.get_running_loop()

    def begin_stop() -> None:
        """Readiness 503 at once, serving on for --drain-s; then uvicorn stops accepting and gives
        in-flight requests --grace-s. A second signal skips what is left of the drain."""
        if backend.draining or cfg.drain_s <= 0:
            server.should_exit = True
            return
        backend.draining = True
        log.info("front: signal received: /health/ready 503, draining %g s", cfg.drain_s)
        loop.call_later(cfg.drain_s, setattr, server, "should_exit", True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, begin_stop)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        host, port = sock.getsockname()[:2]
        # Worded unlike the "front listening on HOST:PORT" line below, which launchers and tests parse.
        log.info("front: serving %r at %s://%s:%d from the processor at %s", backend.model_name,
                 "https" if https else "http", host, port, backend.address)
        print(f"front listening on {host}:{port}", flush=True)
        await task
    finally:
        await backend.channel.close()
        if metrics is not None:
            metrics.close()
