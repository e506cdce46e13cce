"""When does the split pay? TTFT of one-image requests with the image encoded by the encoder service
vs by the processor's local encoder (--local-encode-max-patches), same model, same requests.

    python bench/local_encoder.py                       # bench-size Qwen2-VL, 112/224/448 px, concurrency 1 and 8
    python bench/local_encoder.py --quick               # tiny model, a smoke run (~1 min)

Two `triptych up` deployments, one after the other (--quick starts both at once): "service" (the
default, threshold 0) and "local" (a threshold that takes every image of the run). Each request
carries its own image (seeded noise, so no cache can answer it) and asks for --new-tokens tokens;
TTFT is the client's time to the first streamed token. Writes JSON: per mode, image size (with its
patches) and concurrency the TTFT p50 / p90 / mean, and local/service ratios, the numbers the default
of --local-encode-max-patches comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc
from PIL import Image

from bench.triptych_side import TriptychUp, service_env
from bench.workload import IMAGE_PROMPT, _png
from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.server import channel_options
from services.models.checkpoint import Checkpoint
from services.processor.local_encoder import item_patches
from services.tiny_checkpoints import make_model

MODES = ("service", "local")


@dataclass(frozen=True)
class Row:
    """TTFT of one (mode, image size, concurrency) cell, in seconds."""

    mode: str
    image_px: int
    patches: int
    concurrency: int
    requests: int
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_mean_s: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--model-dir", type=Path, help="checkpoint folder (default: build/bench-models/qwen2_vl-SIZE)")
    p.add_argument("--image-px", default="112,224,448", help="square image sides, comma-separated")
    p.add_argument("--concurrency", default="1,8", help="requests in flight, comma-separated")
    p.add_argument("--requests", type=int, default=16, help="requests per cell")
    p.add_argument("--new-tokens", type=int, default=2, help="tokens per request (TTFT is the first)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 112 px, 2 requests, concurrency 1,2, "
                                                      "both deployments started at once")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "local_encoder.json")
    p.add_argument("--logs-dir", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.model_size, args.image_px, args.concurrency, args.requests = "tiny", "112", "1,2", 2
    return args


def model_dir(args: argparse.Namespace) -> Path:
    if args.model_dir is not None:
        return args.model_dir.resolve()
    path = ROOT / "build" / "bench-models" / f"qwen2_vl-{args.model_size}"
    if not (path / "config.json").exists():
        make_model("qwen2_vl", path, seed=0, size=args.model_size)
    return path


def image_patches(model: Path, image_px: int) -> int:
    """The tower input rows of one image of this size, as the local encoder's threshold counts them."""
    family = Checkpoint(model).family
    processor = family.load_processor(model)
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "image"}]}])
    (item,) = family.preprocess(processor, text, [Image.new("RGB", (image_px, image_px))]).items
    return item_patches(family, item)


async def _ttft(stub, image: bytes, new_tokens: int) -> float:
    request = processor_pb2.StreamGenerateRequest(
        messages=build_messages(IMAGE_PROMPT, [image]),
        sampling=generation_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    sent, first = time.perf_counter(), None
    async for event in stub.StreamGenerate(request, timeout=3600):  # read to the end: decoding loads the LLM
        if event.token_ids and first is None:
            first = time.perf_counter() - sent
    if first is None:
        raise RuntimeError("the stream ended without a token")
    return first


async def _cell(address: str, images: list[bytes], concurrency: int, new_tokens: int) -> list[float]:
    gate = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)

        async def one(image: bytes) -> float:
            async with gate:
                return await _ttft(stub, image, new_tokens)

        return list(await asyncio.gather(*(one(image) for image in images)))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def encode_calls(log: Path) -> int:
    """Encode calls (StreamEncode, as the processor calls it) the encoder answered: 0 when every image stayed
    local. Only answered ones: the pool's probe of each replica (a cache reference it cannot hold) is NOT_FOUND."""
    return sum("EncoderService/StreamEncode OK " in line for line in log.read_text().splitlines()
               if line.startswith("[encoder]"))


def start(mode: str, model: Path, sizes: dict[int, int], args: argparse.Namespace) -> TriptychUp:
    """The mode's deployment: "local" with a threshold that takes every image of the run, "service" with 0."""
    threshold = max(sizes.values()) if mode == "local" else 0
    return TriptychUp(model, args.logs_dir / f"local_encoder-{mode}.log", service_env(None),
                      ["--local-encode-max-patches", str(threshold)])


def run_mode(mode: str, up: TriptychUp, sizes: dict[int, int], levels: list[int], args: argparse.Namespace,
             seed_base: int) -> tuple[list[Row], int]:
    """Every image size at every concurrency on the mode's deployment (stopped at the end). Images are
    distinct across the whole run. Returns the rows and the encoder's Encode calls."""
    rows: list[Row] = []
    with up:
        seed = seed_base
        for image_px, patches in sizes.items():
            warmup = [_png(image_px, seed=seed + i) for i in range(2)]  # first-call costs of this size
            asyncio.run(_cell(up.address, warmup, 1, args.new_tokens))
            seed += 2
            for concurrency in levels:
                images = [_png(image_px, seed=seed + i) for i in range(args.requests)]
                seed += args.requests
                ttfts = asyncio.run(_cell(up.address, images, concurrency, args.new_tokens))
                rows.append(Row(mode, image_px, patches, concurrency, len(ttfts), _quantile(ttfts, 0.5),
                                _quantile(ttfts, 0.9), statistics.fmean(ttfts)))
                print(f"{mode:8s} {image_px:4d}px {patches:5d} patches c={concurrency:<3d} "
                      f"TTFT p50 {rows[-1].ttft_p50_s * 1e3:7.1f} ms", flush=True)
    return rows, encode_calls(up.log_path)


def start_both(model: Path, sizes: dict[int, int], args: argparse.Namespace) -> dict[str, TriptychUp]:
    """--quick: both deployments started at once (their start-ups, not their figures, dominate a smoke
    run; one measures while the other idles). If one fails to start, the other is stopped."""
    with ThreadPoolExecutor(len(MODES)) as pool:
        futures = {mode: pool.submit(start, mode, model, sizes, args) for mode in MODES}
    ups = {mode: f.result() for mode, f in futures.items() if f.exception() is None}
    if len(ups) < len(MODES):
        for up in ups.values():
            up.stop()
        raise next(f.exception() for f in futures.values() if f.exception() is not None)
    return ups


def ratios(rows: list[Row]) -> list[dict]:
    """local / service TTFT per image size and concurrency (below 1: encoding locally pays)."""
    service = {(r.image_px, r.concurrency): r for r in rows if r.mode == "service"}
    return [{"image_px": r.image_px, "patches": r.patches, "concurrency": r.concurrency,
             "ttft_p50_local_over_service": r.ttft_p50_s / service[(r.image_px, r.concurrency)].ttft_p50_s,
             "ttft_mean_local_over_service": r.ttft_mean_s / service[(r.image_px, r.concurrency)].ttft_mean_s}
            for r in rows if r.mode == "local" and (r.image_px, r.concurrency) in service]


def run(args: argparse.Namespace) -> dict:
    model = model_dir(args)
    sizes = {px: image_patches(model, px) for px in (int(x) for x in args.image_px.split(","))}
    levels = [int(x) for x in args.concurrency.split(",")]
    seeds_per_mode = len(sizes) * (2 + len(levels) * args.requests)
    rows: list[Row] = []
    calls: dict[str, int] = {}
    started = start_both(model, sizes, args) if args.quick else {}
    try:
        for index, mode in enumerate(MODES):
            up = started.get(mode) or start(mode, model, sizes, args)  # the full run: one deployment at a time
            mode_rows, calls[mode] = run_mode(mode, up, sizes, levels, args, seed_base=1000 + index * seeds_per_mode)
            rows += mode_rows
    finally:
        for up in started.values():  # a failed mode leaves the other's deployment up
            up.stop()
    return {
        "settings": {"model": str(model), "model_size": args.model_size, "image_px": list(sizes),
                     "concurrency": levels, "requests": args.requests, "new_tokens": args.new_tokens,
                     "local_threshold_patches": max(sizes.values()), "quick": args.quick},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "threads": "triptych up: encoder and LLM share the cores; the processor (and its local tower) 1 thread",
        "encoder_calls": calls,
        "results": [asdict(r) for r in rows],
        "ratios": ratios(rows),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.logs_dir.mkdir(parents=True, exist_ok=True)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
