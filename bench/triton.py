"""The encoder's Triton backend vs its torch backend: latency and images/s, same model, same run.

    python bench/triton.py            # build/bench-models/qwen2_vl-bench (built if absent), 448² images, c=1,8
    python bench/triton.py --quick    # tiny Qwen2-VL, a few 224² images: a smoke test

One EncoderServicer per measurement behind production's gRPC server on loopback, in this process
(bench/encoder.py's LoopbackEncoder), batching off and no cache (every image is new): `torch` runs the
tower itself; `triton-http` and `triton-shm` send each item to a real tritonserver on this host
(scripts/setup_triton.sh) serving `triptych export-triton`'s repository, tensors as binary HTTP
bodies or through system shared memory. The tower gets the same torch threads in both (--torch-threads,
the encoder's or the Triton instance's). Clients send Encode calls of one item each, --concurrency
calls in flight.

Where the time goes: for Triton runs, Triton's own statistics split each request into queue,
compute_input (tensors into the Python stub), compute_infer (model.py: the tower) and compute_output;
what is left of the encoder's latency (`encoder_overhead_ms`: the p50 latency less Triton's mean
per-request parts) is gRPC, HTTP, (de)serialisation and the encoder itself. Also
`executions_per_request` (below 1: Triton's dynamic batcher put requests in one execute).
Writes one JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tritonclient.http as httpclient

from bench.encoder import LoopbackEncoder, _load, prepare_items
from services.common.config import EncoderConfig
from services.encoder.triton_export import ExportOptions, export, model_name
from services.models.checkpoint import Checkpoint
from services.tiny_checkpoints import make_model
from tests.encoder.triton_server import TritonServer

BACKENDS = ("torch", "triton-http", "triton-shm")
NAME = "bench"  # the Triton models' name


def _triton_stats(url: str, model: str) -> dict:
    stats = httpclient.InferenceServerClient(url).get_inference_statistics(model)["model_stats"][0]
    return {"inference_count": stats["inference_count"], "execution_count": stats["execution_count"],
            **{key: stats["inference_stats"][key]["ns"] for key in
               ("queue", "compute_input", "compute_infer", "compute_output")}}


def _where(before: dict, after: dict) -> dict:
    """Per request, ms: Triton's split of the run's requests."""
    count = max(1, after["inference_count"] - before["inference_count"])
    return {"executions_per_request": (after["execution_count"] - before["execution_count"]) / count,
            **{f"triton_{key}_ms": (after[key] - before[key]) / count / 1e6
               for key in ("queue", "compute_input", "compute_infer", "compute_output")}}


async def _measure(model: Path, cfg: EncoderConfig, items: list, concurrency: int, stats_of: tuple[str, str] | None,
                   settle_s: float) -> dict:
    encoder = LoopbackEncoder(model, cfg)
    try:
        async with encoder:
            await _load(encoder, items[: max(2, concurrency)], concurrency, "warm")
            before = _triton_stats(*stats_of) if stats_of else None
            figures = await _load(encoder, items, concurrency, "run")
            if stats_of:
                await asyncio.sleep(settle_s)  # the Python backend reports its statistics after it responds
                figures.update(_where(before, _triton_stats(*stats_of)))
                figures["encoder_overhead_ms"] = figures["latency_p50_s"] * 1000 - sum(
                    figures[f"triton_{key}_ms"] for key in ("queue", "compute_input", "compute_infer", "compute_output"))
            return figures
    finally:
        encoder.servicer.backend.close()


def run(args: argparse.Namespace) -> dict:
    model = args.model
    if not (model / "config.json").exists():
        make_model("qwen2_vl", model, size="tiny" if args.quick else "bench")
    checkpoint = Checkpoint(model)
    items = prepare_items(model, args.images, args.image_px)
    results = []
    with tempfile.TemporaryDirectory(prefix="triptych-triton-bench-") as tmp:
        repo = Path(tmp) / "repo"
        export(checkpoint, repo, ExportOptions(name=NAME, max_batch_size=8, instances=args.instances,
                                               torch_threads=args.torch_threads))
        triton = TritonServer(repo, Path(tmp) / "tritonserver.log").start(timeout_s=600)
        try:
            for backend in args.backends:
                for concurrency in args.concurrency:
                    extra = {} if backend == "torch" else {
                        "backend": "triton", "triton_url": triton.url, "triton_model": NAME,
                        "triton_transport": backend.removeprefix("triton-"), "triton_workers": max(concurrency, 1)}
                    cfg = EncoderConfig(model=model, torch_threads=args.torch_threads, cache_mib=0, **extra)
                    stats_of = None if backend == "torch" else (triton.url, model_name(NAME, "image"))
                    figures = asyncio.run(_measure(model, cfg, items, concurrency, stats_of, 0.5 if args.quick else 2))
                    results.append({"backend": backend, "concurrency": concurrency, **figures})
                    print(f"{backend} c={concurrency}: {figures['images_per_s']:.2f} img/s, "
                          f"p50 {figures['latency_p50_s'] * 1000:.1f} ms", flush=True)
        finally:
            triton.stop()
    torch_rate = {r["concurrency"]: r["images_per_s"] for r in results if r["backend"] == "torch"}
    for r in results:
        if r["concurrency"] in torch_rate:
            r["images_per_s_vs_torch"] = r["images_per_s"] / torch_rate[r["concurrency"]]
    return {"model": str(model), "family": checkpoint.family.name, "image_px": args.image_px,
            "images": args.images, "torch_threads": args.torch_threads, "triton_instances": args.instances,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny Qwen2-VL, 4 images of 224²: a smoke test")
    p.add_argument("--model", type=Path, help="checkpoint folder (default: build/bench-models/qwen2_vl-bench)")
    p.add_argument("--images", type=int, default=32, help="images per measurement")
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--concurrency", default="1,8", help="comma-separated Encode calls in flight")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated: " + ", ".join(BACKENDS))
    p.add_argument("--torch-threads", type=int, default=1, help="the tower's torch threads, either backend")
    p.add_argument("--instances", type=int, default=1, help="Triton model instances")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "triton.json")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.image_px = 4, 224
        from tests.checkpoints import tiny_checkpoint

        args.model = args.model or tiny_checkpoint("qwen2_vl")
    args.model = (args.model or ROOT / "build" / "bench-models" / "qwen2_vl-bench").resolve()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.backends = [b for b in args.backends.split(",") if b]
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        p.error(f"unknown backends {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    started = time.time()
    report = run(args)
    report["wall_s"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
