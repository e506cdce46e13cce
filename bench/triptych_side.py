"""Triptych as a black box: `triptych up` (three processes on loopback) and a gRPC streaming client.

Only the public contract is used (ProcessorService.StreamGenerate), so this measures whatever
the services are today. Each request carries its own x-request-id (the services log every call
with it), so the services' log lines can be joined to the client's timestamps afterwards.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from bench.workload import Request, Sample, SideResult, stop_process, summarize
from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.interceptors import REQUEST_ID_KEY
from services.common.server import channel_options

ROOT = Path(__file__).resolve().parent.parent


class TriptychUp:
    """`python -m services.cli up --model DIR --port 0 [extra]`, its log lines kept in `log_path`."""

    def __init__(self, model_dir: Path, log_path: Path, env: dict[str, str], extra_args: list[str]):
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        argv = [sys.executable, "-m", "services.cli", "up", "--model", str(model_dir), "--port", "0", *extra_args]
        # The children's log lines go to the launcher's stderr (the file); its stdout says where it listens.
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT, env=env)
        self.address = self._wait_listening(timeout_s=600)

    def _wait_listening(self, timeout_s: float) -> str:
        found: list[str] = []

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("processor listening on "):
                    found.append(line.split()[-1])
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not found:
            self.stop()
            raise RuntimeError(f"triptych up did not start; its log: {self.log_path}")
        return found[0]

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()

    def __enter__(self) -> TriptychUp:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def grpc_request(request: Request, new_tokens: int) -> processor_pb2.StreamGenerateRequest:
    sampling = generation_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)  # temperature 0: greedy
    images = [request.image] if request.image is not None else []
    return processor_pb2.StreamGenerateRequest(messages=build_messages(request.text, images), sampling=sampling)


async def _one(stub, request: Request, new_tokens: int, request_id: str) -> Sample:
    sent, first, ids = time.perf_counter(), None, []
    call = stub.StreamGenerate(grpc_request(request, new_tokens), timeout=3600,
                               metadata=((REQUEST_ID_KEY, request_id),))
    async for event in call:
        if event.token_ids:
            first = first or time.perf_counter()
            ids.extend(event.token_ids)
    done = time.perf_counter()
    if first is None or len(ids) != new_tokens:
        raise RuntimeError(f"request {request.index} gave {len(ids)} tokens, not {new_tokens}")
    return Sample(request.index, sent, first, done, len(ids), ids)


async def _run(address: str, requests: list[Request], new_tokens: int, concurrency: int, run_tag: str,
               tick: Callable[[], None]) -> tuple[list[Sample], float, dict[str, float]]:
    """All requests, at most `concurrency` in flight. Returns samples, wall seconds, and each
    request id's send time on the wall clock (the services' logs are on the wall clock)."""
    gate = asyncio.Semaphore(concurrency)
    wall_sent: dict[str, float] = {}
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        await _one(stub, requests[0], new_tokens, f"{run_tag}-warmup")  # connection, first-call costs

        async def gated(request: Request) -> Sample:
            async with gate:
                request_id = f"{run_tag}-{request.index}"
                wall_sent[request_id] = time.time()
                sample = await _one(stub, request, new_tokens, request_id)
                tick()
                return sample

        start = time.perf_counter()
        samples = await asyncio.gather(*(gated(r) for r in requests))
        return list(samples), time.perf_counter() - start, wall_sent


def run_triptych(address: str, requests: list[Request], new_tokens: int, mode: str, concurrency: int,
                 threads: str, tick: Callable[[], None], run_tag: str = "bench") -> tuple[SideResult, list[Sample],
                                                                                        dict[str, float]]:
    samples, wall, wall_sent = asyncio.run(_run(address, requests, new_tokens, concurrency, run_tag, tick))
    result = summarize("triptych", mode, concurrency, samples, wall, threads,
                       note="triptych up: processor, encoder, LLM as processes on loopback; gRPC StreamGenerate")
    return result, samples, wall_sent


def service_env(threads: int | None) -> dict[str, str]:
    """The services' environment: offline, and OMP_NUM_THREADS only if asked (else each service
    keeps its own choice; this script's own OMP setting must not leak into them)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env
