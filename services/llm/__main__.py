"""`python -m services.llm --model DIR --port N` (same as `triptych serve llm`)."""

from __future__ import annotations

import sys

from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig
from services.common.server import Server
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint


async def serve(cfg: LlmConfig, checkpoint: Checkpoint) -> None:
    servicer = LlmServicer(checkpoint, cfg)
    server = Server(cfg.server, lambda s: llm_pb2_grpc.add_LlmServiceServicer_to_server(servicer, s),
                    [llm_pb2.DESCRIPTOR.services_by_name["LlmService"].full_name])
    await server.start()
    try:
        await server.serve_until_signal("llm")
    finally:
        servicer.engine.stop()


if __name__ == "__main__":
    from services.cli import main

    sys.exit(main(["serve", "llm", *sys.argv[1:]]))
