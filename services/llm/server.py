"""The LLM's server: LlmService with the production interceptors, health and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import torch
from grpc_health.v1 import health_pb2

from services.common import tracing
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig, ServerConfig
from services.common.server import Server, start_server as start_common
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint

SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"]


async def start_server(servicer: LlmServicer, cfg: ServerConfig) -> tuple[Server, int]:
    return await start_common(cfg, SERVICE, lambda s: llm_pb2_grpc.add_LlmServiceServicer_to_server(servicer, s))


def _health_follows_engine(server: Server, loop: asyncio.AbstractEventLoop) -> Callable[[bool], None]:
    """Health NOT_SERVING while a crashed engine restarts, SERVING again once it has loaded the model
    (a no-op once graceful shutdown has begun)."""
    def on_ready(ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING

        async def update() -> None:
            for name in ["", *server.service_names]:
                await server.health.set(name, status)

        asyncio.run_coroutine_threadsafe(update(), loop)

    return on_ready


async def serve(cfg: LlmConfig, checkpoint: Checkpoint) -> None:
    """Starts the engine process (SERVING only once it has loaded the model), serves until SIGTERM,
    finishes in-flight requests, then stops the engine process."""
    torch.set_num_threads(1)  # this process only parses requests; the engine process has the cores
    tracing.setup("llm", cfg.server.otel)
    servicer = LlmServicer(checkpoint, cfg)
    try:
        server, _ = await start_server(servicer, cfg.server)
        servicer.engine.on_ready = _health_follows_engine(server, asyncio.get_running_loop())
        await server.serve_until_signal("llm")
    finally:
        servicer.stop()
