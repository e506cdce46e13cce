"""Embeddings from one process to another on loopback: inline gRPC vs chunked vs a shared-memory handle, GB/s.

    OMP_NUM_THREADS=1 .venv/bin/python bench/transport.py [--sizes-mb 1 16 256] [--repeats 3]
        [--chunk-mib 4] [--quick] [--json OUT]

One request carries one float32 tensor of each size from a client process to a server process, as
the processor sends embeddings to the LLM: the clock runs from a torch tensor in the client to a
torch tensor in the server (the reply says it arrived), through the same code the services run:
- inline: `to_proto` -> LlmService.StreamGenerate (limits raised to carry it) -> `from_proto`;
- chunked: the same cut by `chunks.split_generate_request` into messages of --chunk-mib (4 MiB, gRPC's
  default limit) -> LlmService.ChunkedStreamGenerate -> `chunks.receive_generate_request`;
- shm: `to_proto` -> `shm.Exporter.export` (the encoder's memfd) -> a handle in StreamGenerate ->
  `shm.Reader` copies it out of /proc/<client>/fd/<n> and claims the region.
The server is a separate process with the production gRPC server builder; it parses each tensor as
the LLM does and answers with its element count. The best of --repeats is reported (the CPU is shared).
--quick: 1 and 16 MB, one repeat. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common import chunks, shm
from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import ServerConfig
from services.common.server import channel_options, start_server
from services.common.tensors import from_proto, to_proto

MODES = ("inline", "chunked", "shm")
HIDDEN = 4096  # floats per row: 16 KiB rows, as a 4k-wide LLM's embeddings
LIMIT_MIB = 1024  # inline: both ends take messages this large
SERVICE = llm_pb2.DESCRIPTOR.services_by_name["LlmService"]


# ---- the server process ----------------------------------------------------------------------------
class Sink(llm_pb2_grpc.LlmServiceServicer):
    """Takes embeddings as the LLM does (inline, chunks, shared memory) and answers their element count."""

    def __init__(self):
        self._parse_pool = ThreadPoolExecutor(max_workers=1)

    async def StreamGenerate(self, request, context):
        count = await asyncio.get_running_loop().run_in_executor(self._parse_pool, _parse, request, None)
        yield llm_pb2.StreamGenerateResponse(prompt_tokens=count)

    async def ChunkedStreamGenerate(self, request_iterator, context):
        request, assembler = await chunks.receive_generate_request(request_iterator)
        count = await asyncio.get_running_loop().run_in_executor(self._parse_pool, _parse, request, assembler)
        yield llm_pb2.ChunkedStreamGenerateResponse(response=llm_pb2.StreamGenerateResponse(prompt_tokens=count))


def _parse(request: llm_pb2.StreamGenerateRequest, assembler: chunks.Assembler | None) -> int:
    with shm.Reader() as regions:
        external = {"shm": regions, **({"chunked_id": assembler.finish()} if assembler else {})}
        return sum(from_proto(mm.embeddings, "embeddings", external).numel() for mm in request.prompt.multimodal_inputs)


async def serve() -> None:
    server, port = await start_server(ServerConfig(port=0, max_message_mib=LIMIT_MIB), SERVICE,
                                      lambda s: llm_pb2_grpc.add_LlmServiceServicer_to_server(Sink(), s))
    print(port, flush=True)
    await server.grpc.wait_for_termination()


# ---- the client --------------------------------------------------------------------------------------
def _request(embeddings: tensor_pb2.Tensor) -> llm_pb2.StreamGenerateRequest:
    request = llm_pb2.StreamGenerateRequest()
    # One copy into place: nested constructors would copy the bytes once per level.
    request.prompt.multimodal_inputs.add().embeddings.CopyFrom(embeddings)
    return request


async def send(stub: llm_pb2_grpc.LlmServiceStub, tensor: torch.Tensor, mode: str, exporter: shm.Exporter,
               chunk_bytes: int) -> float:
    """Seconds from `tensor` here to its copy parsed in the server."""
    start = time.perf_counter()
    proto = await asyncio.to_thread(to_proto, tensor)
    if mode == "shm":
        assert await asyncio.to_thread(exporter.export, [proto]), "shared memory refused the tensor"
    request = await asyncio.to_thread(_request, proto)
    if mode == "chunked":
        messages = await asyncio.to_thread(chunks.split_generate_request, request, chunk_bytes)
        replies = [r.response async for r in stub.ChunkedStreamGenerate(iter(messages), timeout=600)]
    else:
        replies = [r async for r in stub.StreamGenerate(request, timeout=600)]
    seconds = time.perf_counter() - start
    assert replies[0].prompt_tokens == tensor.numel(), (replies[0].prompt_tokens, tensor.numel())
    return seconds


async def measure(address: str, sizes_mb: list[int], modes: tuple[str, ...], repeats: int, chunk_mib: int) -> list[dict]:
    exporter = shm.Exporter(ttl_s=60, max_bytes=4 << 30)
    results = []
    async with grpc.aio.insecure_channel(address, options=channel_options(LIMIT_MIB)) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        await send(stub, torch.zeros(4, HIDDEN), "inline", exporter, 1 << 20)  # connect, warm up
        for size_mb in sizes_mb:
            rows = max(1, (size_mb << 20) // (HIDDEN * 4))
            tensor = torch.randn(rows, HIDDEN, generator=torch.Generator().manual_seed(size_mb))
            for mode in modes:
                times = [await send(stub, tensor, mode, exporter, chunks.chunk_budget(chunk_mib << 20))
                         for _ in range(repeats)]
                best = min(times)
                results.append({"mode": mode, "size_mb": size_mb, "bytes": tensor.numel() * 4, "seconds": best,
                                "gb_per_s": tensor.numel() * 4 / best / 1e9, "all_seconds": times})
                print(f"{size_mb:>5} MB  {mode:<8} {best * 1000:9.1f} ms  {results[-1]['gb_per_s']:6.2f} GB/s",
                      flush=True)
    exporter.close()
    return results


def run(sizes_mb: list[int], modes: tuple[str, ...] = MODES, repeats: int = 3, chunk_mib: int = 4) -> dict:
    """Starts the server process, measures every size and mode, stops it; the JSON-ready report."""
    if "shm" in modes and not shm.AVAILABLE:
        modes = tuple(m for m in modes if m != "shm")
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        port = int(server.stdout.readline())
        results = asyncio.run(measure(f"127.0.0.1:{port}", sizes_mb, modes, repeats, chunk_mib))
    finally:
        server.kill()
        server.wait()
    return {"bench": "transport", "hidden": HIDDEN, "dtype": "float32", "chunk_mib": chunk_mib, "repeats": repeats,
            "cpu_count": os.cpu_count(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 256])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-mib", type=int, default=4, help="message size of the chunked mode")
    parser.add_argument("--quick", action="store_true", help="1 and 16 MB, one repeat (a smoke test)")
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve())
        return
    if args.quick:
        args.sizes_mb, args.repeats = [1, 16], 1
    report = run(args.sizes_mb, tuple(args.modes), args.repeats, args.chunk_mib)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
