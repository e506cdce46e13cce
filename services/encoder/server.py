"""The encoder's server: EncoderService with the production interceptors, health and reflection."""

from __future__ import annotations

import asyncio
import logging

from grpc_health.v1 import health_pb2

from services.common import tracing
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig, ServerConfig
from services.common.metrics import EncoderCollector
from services.common.server import Server
from services.common.server import start_server as start_common
from services.encoder.backends import TowerBackend
from services.encoder.servicer import EncoderServicer
from services.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]


async def start_server(servicer: EncoderServicer, cfg: ServerConfig) -> tuple[Server, int]:
    return await start_common(cfg, SERVICE, lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
                              collectors=[EncoderCollector(servicer)])


async def follow_backend(server: Server, backend: TowerBackend) -> None:
    """Keeps the encoder's health with its backend's: NOT_SERVING while the backend is not ready (Triton
    down or reloading), SERVING again once it is. Health set during graceful shutdown is ignored."""
    loop = asyncio.get_running_loop()
    serving = True
    while True:
        await asyncio.sleep(backend.health_interval_s)
        ready = await loop.run_in_executor(None, backend.ready)
        if ready == serving:
            continue
        serving = ready
        log.warning("encoder backend %s: health %s", encoder_pb2.EncoderBackend.Name(backend.proto),
                    "SERVING" if ready else "NOT_SERVING (the towers cannot run)")
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *server.service_names]:
            await server.health.set(name, status)


async def serve(cfg: EncoderConfig, checkpoint: Checkpoint) -> None:
    """Loads the tower (or checks Triton's), serves until SIGTERM, then finishes in-flight requests."""
    tracing.setup("encoder", cfg.server.otel)
    servicer = EncoderServicer(checkpoint, cfg)
    server, _ = await start_server(servicer, cfg.server)
    follower = (asyncio.create_task(follow_backend(server, servicer.backend))
                if servicer.backend.health_interval_s > 0 else None)
    try:
        await server.serve_until_signal("encoder")
    finally:
        if follower is not None:
            follower.cancel()
        servicer.close()
