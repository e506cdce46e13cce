"""Encoder pool figures: TTFT of a repeated image, cold vs warm, and the kill test's failed requests.

    .venv/bin/python bench/encoder_pool.py [--size tiny|bench] [--quick] [--out bench/results/encoder_pool.json]

Both run the services as separate processes on loopback: two encoders, one LLM, one processor
(`--encoder` twice), through the public ProcessorService.StreamGenerate.
- `repeated_image_ttft`: each image sent twice in a row; TTFT of the first (cold: encoded) and of
  the second (warm: the pool sends the replica that encoded it a cache reference, answered from
  its embedding cache). The issue's goal: warm / cold <= 0.3. With encoders that predate cache
  references the second is encoded again and the ratio stays near 1 (`cache_references` says).
- `kill_test`: a stream of requests (several images, repeats, `concurrency` in flight); one
  encoder gets SIGKILL after `kill_after` answers. The goal: 0 failed requests.
Importable: bench/encoder.py reports `run(...)`'s dict.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.triptych_side import service_env  # noqa: E402
from services.client import build_messages  # noqa: E402
from services.common.api.triptych.common.v1 import generation_pb2  # noqa: E402
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc  # noqa: E402
from services.common.server import channel_options  # noqa: E402
from services.tiny_checkpoints import make_model  # noqa: E402

PROMPT = "Describe this image in detail."
_LISTENING = re.compile(r"^(\w+) listening on (\S+)$")


def image(size_px: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size_px, size_px, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


class Service:
    """One `triptych serve KIND` process; its output goes to a log file."""

    def __init__(self, kind: str, argv: list[str], log_path: Path):
        self.kind, self.log_path, self.address = kind, log_path, None
        self._listening = threading.Event()
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", kind, *argv], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=service_env(None))
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        with self.log_path.open("w") as log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                match = _LISTENING.match(line.strip())
                if match and match.group(1) == self.kind:
                    self.address = match.group(2)
                    self._listening.set()
        self._listening.set()

    def wait_address(self, timeout_s: float = 600) -> str:
        if not self._listening.wait(timeout_s) or self.address is None:
            raise RuntimeError(f"{self.kind} did not start; see {self.log_path}")
        return self.address

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.send(sig)
        self.wait()

    def send(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self) -> None:
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Deployment:
    encoders: list[Service]
    llm: Service
    processor: Service

    @property
    def address(self) -> str:
        return self.processor.address


@contextmanager
def deployment(model_dir: Path, log_dir: Path, num_encoders: int = 2, torch_threads: int = 1) -> Iterator[Deployment]:
    """`num_encoders` encoders, an LLM and a processor using all the encoders, as processes."""
    log_dir.mkdir(parents=True, exist_ok=True)
    model = ["--model", str(model_dir), "--port", "0", "--torch-threads", str(torch_threads)]
    encoders = [Service("encoder", model, log_dir / f"encoder{i}.log") for i in range(num_encoders)]
    llm = Service("llm", model, log_dir / "llm.log")
    started = [*encoders, llm]
    try:
        flags = [x for e in encoders for x in ("--encoder", e.wait_address())]
        processor = Service("processor", ["--model", str(model_dir), "--port", "0", *flags, "--llm",
                                          llm.wait_address()], log_dir / "processor.log")
        started.append(processor)
        processor.wait_address()
        yield Deployment(encoders, llm, processor)
    finally:  # all at once: each takes seconds to exit (the LLM's engine process most)
        for service in reversed(started):
            service.send()
        for service in started:
            service.wait()


def _request(img: bytes, new_tokens: int) -> processor_pb2.StreamGenerateRequest:
    return processor_pb2.StreamGenerateRequest(
        messages=build_messages(PROMPT, [img]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


def ttft_s(stub, img: bytes, new_tokens: int) -> float:
    """Seconds from sending to the first token (the rest of the stream is read, then dropped)."""
    sent, first = time.perf_counter(), None
    for event in stub.StreamGenerate(_request(img, new_tokens), timeout=600):
        if event.token_ids and first is None:
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first - sent


def repeated_image_ttft(address: str, image_px: int, pairs: int, new_tokens: int = 4) -> dict:
    """Each of `pairs` new images twice in a row: TTFT cold (first) and warm (second), medians and ratio."""
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        ttft_s(stub, image(image_px, seed=9999), new_tokens)  # connections, first-call costs
        cold, warm = [], []
        for seed in range(pairs):
            img = image(image_px, seed=1000 + seed)
            cold.append(ttft_s(stub, img, new_tokens))
            warm.append(ttft_s(stub, img, new_tokens))
    return {"image_px": image_px, "pairs": pairs, "cold_ttft_s": cold, "warm_ttft_s": warm,
            "cold_ttft_p50_s": statistics.median(cold), "warm_ttft_p50_s": statistics.median(warm),
            "warm_over_cold": statistics.median(warm) / statistics.median(cold), "goal_warm_over_cold": 0.3}


def kill_test(dep: Deployment, image_px: int, requests: int, concurrency: int, kill_after: int,
              distinct_images: int = 5, new_tokens: int = 4) -> dict:
    """A stream of requests (images repeated round robin); encoder 0 gets SIGKILL after `kill_after`
    answers. Counts the requests that failed (the goal is 0) and those answered."""
    images = [image(image_px, seed=2000 + i) for i in range(distinct_images)]
    failures: list[str] = []
    answered = 0
    start = time.perf_counter()
    with grpc.insecure_channel(dep.address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        with ThreadPoolExecutor(concurrency) as workers:
            futures = [workers.submit(ttft_s, stub, images[n % distinct_images], new_tokens) for n in range(requests)]
            for done, future in enumerate(as_completed(futures), start=1):
                try:
                    future.result()
                    answered += 1
                except grpc.RpcError as err:
                    failures.append(f"{err.code().name}: {err.details()}")
                if done == kill_after:
                    dep.encoders[0].stop(signal.SIGKILL)
    return {"requests": requests, "concurrency": concurrency, "killed_after": kill_after, "answered": answered,
            "failed_requests": len(failures), "failures": failures[:5], "wall_s": time.perf_counter() - start,
            "goal_failed_requests": 0}


def _cache_references(log_dir: Path) -> bool:
    """Whether the pool sent cache references (the encoders take them): the processor logs it at admission."""
    return "cache references: yes" in (log_dir / "processor.log").read_text()


def run(model_dir: Path, quick: bool = False, log_dir: Path | None = None) -> dict:
    """Both figures, each on a fresh deployment of two encoders (the kill test leaves one dead). --quick
    (a smoke test of the code path, not a figure) shares one deployment: the TTFT pairs, then the kill test."""
    image_px = 224 if quick else 448
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="encoder-pool-"))
    result: dict = {"model": str(model_dir), "image_px": image_px, "encoders": 2, "logs": str(log_dir)}
    if quick:
        with deployment(model_dir, log_dir / "quick") as dep:
            result["repeated_image_ttft"] = repeated_image_ttft(dep.address, image_px, pairs=2)
            result["kill_test"] = kill_test(dep, image_px, requests=8, concurrency=4, kill_after=3)
        result["repeated_image_ttft"]["cache_references"] = _cache_references(log_dir / "quick")
        return result
    with deployment(model_dir, log_dir / "ttft") as dep:
        result["repeated_image_ttft"] = repeated_image_ttft(dep.address, image_px, pairs=10)
    result["repeated_image_ttft"]["cache_references"] = _cache_references(log_dir / "ttft")
    with deployment(model_dir, log_dir / "kill") as dep:
        result["kill_test"] = kill_test(dep, image_px, requests=48, concurrency=4, kill_after=16)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench", choices=["tiny", "bench"])
    parser.add_argument("--model-dir", type=Path, help="a checkpoint folder instead of the built qwen2_vl SIZE")
    parser.add_argument("--quick", action="store_true", help="smaller images, fewer requests: a smoke test")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encoder_pool.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = args.model_dir or ROOT / "build" / "bench-models" / f"qwen2_vl-{args.size}"
    if not (model_dir / "config.json").exists():
        make_model("qwen2_vl", model_dir, seed=0, size=args.size)
    result = run(model_dir, quick=args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0 if result["kill_test"]["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
