"""`python -m services.processor --model DIR --encoder ADDR --llm ADDR --port N`."""

from __future__ import annotations

import sys

from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.config import ProcessorConfig
from services.common.server import Server
from services.models.checkpoint import Checkpoint
from services.processor.servicer import ProcessorServicer


async def serve(cfg: ProcessorConfig, checkpoint: Checkpoint) -> None:
    servicer = ProcessorServicer(checkpoint, cfg)
    await servicer.connect()  # refuses to start against a down service or another model
    server = Server(cfg.server, lambda s: processor_pb2_grpc.add_ProcessorServiceServicer_to_server(servicer, s),
                    [processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"].full_name])
    await server.start()
    try:
        await server.serve_until_signal("processor")
    finally:
        await servicer.close()


if __name__ == "__main__":
    from services.cli import main

    sys.exit(main(["serve", "processor", *sys.argv[1:]]))
