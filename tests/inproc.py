"""The three services in this process on port-0 servers, on one event loop in a background thread.

Cheaper than processes for tests that vary the checkpoint; tests/e2e/ still starts real processes.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2_grpc
from services.common.config import EncoderConfig, LlmConfig, ProcessorConfig, ServerConfig
from services.common.server import Server
from services.encoder.servicer import EncoderServicer
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint
from services.processor.servicer import ProcessorServicer


class InProcessServices:
    def __init__(self, model: Path):
        self.model = model
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.address = self._run(self._start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=300)

    async def _start(self) -> str:
        checkpoint = Checkpoint(self.model)
        server_cfg = ServerConfig(port=0)
        self.encoder = EncoderServicer(checkpoint, EncoderConfig(model=self.model))
        self.llm = LlmServicer(checkpoint, LlmConfig(model=self.model))
        self.servers = [
            Server(server_cfg, lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(self.encoder, s), []),
            Server(server_cfg, lambda s: llm_pb2_grpc.add_LlmServiceServicer_to_server(self.llm, s), []),
        ]
        for server in self.servers:
            await server.start()
        self.processor = ProcessorServicer(checkpoint, ProcessorConfig(
            model=self.model, encoder_addr=self.servers[0].address, llm_addr=self.servers[1].address))
        await self.processor.connect()
        front = Server(server_cfg, lambda s: processor_pb2_grpc.add_ProcessorServiceServicer_to_server(
            self.processor, s), [])
        await front.start()
        self.servers.append(front)
        return front.address

    def stop(self) -> None:
        async def stop_all():
            for server in reversed(self.servers):
                await server.stop(0)
            await self.processor.close()

        self._run(stop_all())
        self.llm.engine.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
