"""`python -m services.encoder --model DIR --port N` (same as `triptych serve encoder`)."""

from __future__ import annotations

import sys

from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig
from services.common.server import Server
from services.encoder.servicer import EncoderServicer
from services.models.checkpoint import Checkpoint


async def serve(cfg: EncoderConfig, checkpoint: Checkpoint) -> None:
    servicer = EncoderServicer(checkpoint, cfg)
    server = Server(cfg.server, lambda s: encoder_pb2_grpc.add_EncoderServiceServicer_to_server(servicer, s),
                    [encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name])
    await server.start()
    await server.serve_until_signal("encoder")


if __name__ == "__main__":
    from services.cli import main

    sys.exit(main(["serve", "encoder", *sys.argv[1:]]))
