"""The encoder's server: EncoderService with the production interceptors, health and reflection."""

from __future__ import annotations

from services.common import tracing
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig, ServerConfig
from services.common.metrics import EncoderCollector
from services.common.server import Server
from services.common.server import start_server as start_common
from services.encoder.servicer import EncoderServicer
from services.models.checkpoint import Checkpoint

SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"]


async def start_server(servicer: EncoderServicer, cfg: ServerConfig) -> tuple[Server, int]:
    return await start_common(cfg, SERVICE, lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
                              collectors=[EncoderCollector(servicer)])


async def serve(cfg: EncoderConfig, checkpoint: Checkpoint) -> None:
    """Loads the tower, serves until SIGTERM, then finishes in-flight requests."""
    tracing.setup("encoder", cfg.server.otel)
    servicer = EncoderServicer(checkpoint, cfg)
    server, _ = await start_server(servicer, cfg.server)
    try:
        await server.serve_until_signal("encoder")
    finally:
        servicer.close()
