"""The three services in this process on port-0 servers, on one event loop in a background thread.

Cheaper than processes for tests that vary the checkpoint; tests/e2e/ still starts real processes.
The servers come from each service's `start_server`, as in production (interceptors, error domain).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from services.common.config import EncoderConfig, LlmConfig, ProcessorConfig, ServerConfig
from services.encoder import server as encoder_server
from services.encoder.servicer import EncoderServicer
from services.llm import server as llm_server
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint
from services.processor import server as processor_server
from services.processor.servicer import ProcessorServicer


class InProcessServices:
    """`processor_options`: ProcessorConfig fields beyond the addresses; `encoder_cls`: an EncoderServicer
    (sub)class, e.g. one that counts its calls."""

    def __init__(self, model: Path, encoder_cls: type[EncoderServicer] = EncoderServicer, **processor_options):
        self.model = model
        self._encoder_cls, self._processor_options = encoder_cls, processor_options
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.address = self._run(self._start())

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=300)

    async def _start(self) -> str:
        checkpoint = Checkpoint(self.model)
        server_cfg = ServerConfig(port=0)
        self.encoder = self._encoder_cls(checkpoint, EncoderConfig(model=self.model))
        self.llm = LlmServicer(checkpoint, LlmConfig(model=self.model))
        encoder, _ = await encoder_server.start_server(self.encoder, server_cfg)
        llm, _ = await llm_server.start_server(self.llm, server_cfg)
        self.servers = [encoder, llm]
        self.processor = ProcessorServicer(checkpoint, ProcessorConfig(
            model=self.model, encoder_addr=encoder.address, llm_addr=llm.address, **self._processor_options))
        await self.processor.connect()
        front, _ = await processor_server.start_server(self.processor, server_cfg)
        self.servers.append(front)
        self.encoder_address, self.llm_address = encoder.address, llm.address
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


class CountingEncoder(EncoderServicer):
    """The encoder service, counting the Encode calls and items that reach it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_calls = 0
        self.num_items = 0

    async def Encode(self, request, context):
        self.num_calls += 1
        self.num_items += len(request.items)
        return await super().Encode(request, context)
