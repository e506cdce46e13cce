"""The processor's server: ProcessorService with the production interceptors, health and reflection."""

from __future__ import annotations

from services.common import tracing
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.config import ProcessorConfig, ServerConfig
from services.common.interceptors import load_auth_token
from services.common.metrics import PoolCollector
from services.common.server import Server, start_server as start_common
from services.models.checkpoint import Checkpoint
from services.processor.servicer import ProcessorServicer

SERVICE = processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"]


async def start_server(servicer: ProcessorServicer, cfg: ServerConfig) -> tuple[Server, int]:
    """Serves a servicer that has already connected to its encoder and LLM (`await servicer.connect()`)."""
    return await start_common(
        cfg, SERVICE, lambda s: processor_pb2_grpc.add_ProcessorServiceServicer_to_server(servicer, s),
        collectors=[PoolCollector(servicer.encoders)], auth_token=load_auth_token(servicer.cfg.auth_token_file))


async def serve(cfg: ProcessorConfig, checkpoint: Checkpoint) -> None:
    """Checks the encoder and LLM serve our model, serves until SIGTERM, finishes in-flight requests."""
    tracing.setup("processor", cfg.server.otel)  # before the servicer opens its channels
    servicer = ProcessorServicer(checkpoint, cfg)
    try:
        await servicer.connect()  # refuses to start against a down service, another model or dtype
        server, _ = await start_server(servicer, cfg.server)
        await server.serve_until_signal("processor")
    finally:
        await servicer.close()
