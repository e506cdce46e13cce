"""The encoder service under load: cross-request batching on vs off, and the embedding cache.

    python bench/encoder.py                       # bench-size Qwen2-VL and LLaVA, concurrency 1, 8, 32
    python bench/encoder.py --quick               # tiny models, a few requests: a smoke test
    python bench/encoder.py --model qwen2_vl=DIR  # an existing checkpoint for a family

One EncoderServicer per measurement, behind production's gRPC server on loopback, in this process;
clients send Encode calls of one item each (a distinct 448x448 image per request, prepared by the
model's HF processor beforehand), `--concurrency` calls in flight. Families: Qwen2-VL (variable-size
patches, concatenated) and LLaVA-1.5 (a fixed-size CLIP tower, crops stacked) -- the two kinds of
tower batching treats differently.

Sections (each a function of a Context returning a JSON-able dict; SECTIONS lists them, so another
section -- wire bytes, shared memory, a replica pool -- is one more entry):
  batching  images/s and latency per --batching mode (off, auto, always) and concurrency, with the
            GPU-deployment figures from GetStats: items per forward, queue wait
  cache     Encode latency of a repeated image, cold (encoded) vs warm (the cache: the item again,
            and a cache reference without tensors)
  wire      bytes on the wire and latency per image: the compressed file vs the processor's tensors
            (bench/wire.py; Qwen2-VL)
  transport one tensor between two processes, inline gRPC vs chunked vs shared memory, 1/16/256 MB
            (bench/transport.py)
  pool      two encoder processes behind one processor: TTFT of a repeated image, cache warm vs cold,
            and the failed requests when one encoder is killed mid-stream (bench/encoder_pool.py)
Writes one JSON (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from services.common.api.triptych.common.v1 import tensor_pb2  # noqa: E402
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc  # noqa: E402
from services.common.config import EncoderConfig, ServerConfig  # noqa: E402
from services.common.tensors import to_named  # noqa: E402
from services.encoder.server import start_server  # noqa: E402
from services.encoder.servicer import EncoderServicer  # noqa: E402
from services.models.checkpoint import Checkpoint  # noqa: E402
from services.tiny_checkpoints import make_model  # noqa: E402

MODEL_DIR = ROOT / "build" / "bench-models"
FAMILIES = ("qwen2_vl", "llava")
MODES = ("off", "auto", "always")
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


class Progress:
    """tqdm when installed, else one line per step."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self._bar = tqdm(total=total, unit="step") if tqdm else None
        self._done, self._total = 0, total

    def step(self, what: str) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.set_description(what)
            self._bar.update(1)
        else:
            print(f"[{self._done}/{self._total}] {what}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class Context:
    """What every section gets: the settings, the checkpoints, and the prepared items per family."""

    args: argparse.Namespace
    models: dict[str, Path]
    items: dict[str, list[dict[str, torch.Tensor]]] = field(default_factory=dict)
    progress: Progress | None = None

    def step(self, what: str) -> None:
        if self.progress is not None:
            self.progress.step(what)


# ---- an encoder on loopback ------------------------------------------------------------------
class LoopbackEncoder:
    """An EncoderServicer behind production's start_server; async clients on one channel."""

    def __init__(self, model: Path, cfg: EncoderConfig):
        self.servicer = EncoderServicer(Checkpoint(model), cfg)
        self.fingerprint = self.servicer.checkpoint.fingerprint

    async def __aenter__(self) -> LoopbackEncoder:  # noqa: PYI034 -- the class is final
        self.server, _ = await start_server(self.servicer, ServerConfig(port=0))
        self.channel = grpc.aio.insecure_channel(self.server.address, options=CHANNEL_OPTIONS)
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()
        await self.server.stop(0)
        self.servicer.batcher.close()

    async def encode(self, *items: encoder_pb2.MediaItem) -> encoder_pb2.EncodeResponse:
        request = encoder_pb2.EncodeRequest(model_fingerprint=self.fingerprint, items=items)
        return await self.stub.Encode(request, timeout=600)

    async def stats(self) -> encoder_pb2.GetStatsResponse:
        return await self.stub.GetStats(encoder_pb2.GetStatsRequest(), timeout=60)


def media_item(mm_hash: str, tensors: dict[str, torch.Tensor] | None) -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=mm_hash,
                                 tensors=to_named(tensors) if tensors is not None else [])


def encoder_config(ctx: Context, model: Path, **overrides) -> EncoderConfig:
    return EncoderConfig(model=model, torch_threads=ctx.args.torch_threads, device=ctx.args.device, **overrides)


# ---- inputs ----------------------------------------------------------------------------------
def prepare_items(model: Path, count: int, image_px: int) -> list[dict[str, torch.Tensor]]:
    """`count` distinct seeded-noise images through the model's HF processor: one item's tensors each."""
    family = Checkpoint(model).family
    processor = family.load_processor(model)
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "image"}]}])
    items = []
    for seed in range(count):
        pixels = np.random.default_rng(seed).integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        (item,) = family.preprocess(processor, text, [image]).items
        items.append(dict(item.encoder_inputs))
    return items


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


# ---- section: batching -----------------------------------------------------------------------
async def _load(encoder: LoopbackEncoder, items: list[dict[str, torch.Tensor]], concurrency: int,
                tag: str) -> dict:
    """Every item once, `concurrency` calls in flight; images/s and latency."""
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(index: int) -> None:
        async with semaphore:
            start = time.perf_counter()
            await encoder.encode(media_item(f"{tag}-{index}", items[index]))
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(len(items))))
    wall_s = time.perf_counter() - start
    return {"images": len(items), "wall_s": wall_s, "images_per_s": len(items) / wall_s,
            "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99)}


def _batching_figures(before: encoder_pb2.BatchingStats, after: encoder_pb2.BatchingStats) -> dict:
    """The run's figures from GetStats before and after it (the max ones include the warm-up)."""
    forwards, items = after.forwards - before.forwards, after.items - before.items
    waited_ms = after.queue_wait_mean_ms * after.items - before.queue_wait_mean_ms * before.items
    return {"forwards": forwards, "items_per_forward_mean": items / max(1, forwards),
            "items_per_forward_max": after.max_items_per_forward,
            "queue_wait_mean_ms": waited_ms / max(1, items), "queue_wait_max_ms": after.queue_wait_max_ms}


async def _measure_batching(model: Path, cfg: EncoderConfig, items: list[dict[str, torch.Tensor]],
                            concurrency: int) -> dict:
    async with LoopbackEncoder(model, cfg) as encoder:
        await _load(encoder, items[: max(2, concurrency)], concurrency, "warm")  # warm-up
        before = (await encoder.stats()).batching
        figures = await _load(encoder, items, concurrency, "run")
        after = (await encoder.stats()).batching
        return {**figures, **_batching_figures(before, after)}


def section_batching(ctx: Context) -> dict:
    """Per family, mode and concurrency: a fresh encoder (no cache: every image is new anyway), a warm-up,
    then every prepared item once."""
    results = []
    for family, model in ctx.models.items():
        for mode in ctx.args.modes:
            for concurrency in ctx.args.concurrency:
                cfg = encoder_config(ctx, model, batching=mode, cache_mib=0, batch_wait_ms=ctx.args.batch_wait_ms)
                figures = asyncio.run(_measure_batching(model, cfg, ctx.items[family], concurrency))
                row = {"family": family, "mode": mode, "concurrency": concurrency, **figures}
                results.append(row)
                ctx.step(f"batching {family} {mode} c={concurrency}: {row['images_per_s']:.1f} img/s")
    return {"results": results, "speedup_vs_off": _speedups(results)}


def _speedups(results: list[dict]) -> list[dict]:
    """images/s of each mode over batching off, same family and concurrency."""
    off = {(r["family"], r["concurrency"]): r["images_per_s"] for r in results if r["mode"] == "off"}
    return [{"family": r["family"], "mode": r["mode"], "concurrency": r["concurrency"],
             "images_per_s_vs_off": r["images_per_s"] / off[(r["family"], r["concurrency"])]}
            for r in results if r["mode"] != "off" and (r["family"], r["concurrency"]) in off]


# ---- section: cache --------------------------------------------------------------------------
async def _measure_cache(model: Path, cfg: EncoderConfig, items: list[dict[str, torch.Tensor]],
                         warm_up: dict[str, torch.Tensor]) -> dict:
    async with LoopbackEncoder(model, cfg) as encoder:
        await encoder.encode(media_item("warm-up", warm_up))
        times: dict[str, list[float]] = {"cold": [], "warm": [], "reference": []}
        for index, tensors in enumerate(items):
            for kind, sent in (("cold", tensors), ("warm", tensors), ("reference", None)):
                start = time.perf_counter()
                reply = await encoder.encode(media_item(f"repeat-{index}", sent))
                times[kind].append(time.perf_counter() - start)
                assert reply.items[0].cache_hit == (kind != "cold"), kind
        cache = (await encoder.stats()).cache
    cold = statistics.median(times["cold"])
    return {"images": len(items), **{f"{k}_p50_s": statistics.median(v) for k, v in times.items()},
            "warm_over_cold": statistics.median(times["warm"]) / cold,
            "reference_over_cold": statistics.median(times["reference"]) / cold,
            "cache": {"hits": cache.hits, "misses": cache.misses, "used_bytes": cache.used_bytes,
                      "entries": cache.entries}}


def section_cache(ctx: Context) -> dict:
    """Per family: for each of --cache-images images, Encode latency cold (first time), warm (the same
    item again) and by reference (no tensors); medians and warm/cold."""
    results = []
    for family, model in ctx.models.items():
        items = ctx.items[family]
        figures = asyncio.run(_measure_cache(model, encoder_config(ctx, model), items[: ctx.args.cache_images],
                                             items[-1]))
        row = {"family": family, **figures}
        results.append(row)
        ctx.step(f"cache {family}: warm/cold {row['warm_over_cold']:.2f}")
    return {"results": results}


# ---- sections measured by their own modules (each also runs alone) ---------------------------
def _variable_size_model(ctx: Context) -> Path:
    """The Qwen2-VL checkpoint: the end-to-end sections measure the bench's main model."""
    if "qwen2_vl" not in ctx.models:
        raise SystemExit("the wire, transport and pool sections measure qwen2_vl: add it to --families")
    return ctx.models["qwen2_vl"]


def section_wire(ctx: Context) -> dict:
    """Bytes on the wire and latency per image, the compressed file vs the HF processor's tensors."""
    from bench import wire

    model = _variable_size_model(ctx)
    images, warmup = (2, 0) if ctx.args.quick else (20, 2)
    with wire.EncoderProcess(model, ctx.args.torch_threads) as encoder:
        results = wire.measure_wire(model, encoder.address, images=images, px=ctx.args.image_px, warmup=warmup)
    ctx.step("wire")
    return {"model": str(model), "image_px": ctx.args.image_px, "results": [asdict(r) for r in results]}


def section_transport(ctx: Context) -> dict:
    """One tensor between two processes: inline gRPC vs chunked vs shared memory, 1 / 16 / 256 MB."""
    from bench import transport

    report = transport.run([1, 16] if ctx.args.quick else [1, 16, 256], repeats=1 if ctx.args.quick else 3)
    ctx.step("transport")
    return report


def section_pool(ctx: Context) -> dict:
    """Two encoder processes behind one processor: TTFT of a repeated image (cache warm vs cold) and
    the failed requests when one encoder is killed mid-stream."""
    from bench import encoder_pool

    report = encoder_pool.run(_variable_size_model(ctx), quick=ctx.args.quick)
    ctx.step("pool")
    return report


SECTIONS: dict[str, Callable[[Context], dict]] = {
    "batching": section_batching, "cache": section_cache, "wire": section_wire, "transport": section_transport,
    "pool": section_pool,
}


def section_steps(name: str, args: argparse.Namespace, num_families: int) -> int:
    """Progress steps of a section (for the bar's total)."""
    if name == "batching":
        return num_families * len(args.modes) * len(args.concurrency)
    return num_families if name == "cache" else 1


# ---- main ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny models, concurrency 2, 4 requests: a smoke test")
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated families to run")
    p.add_argument("--model", action="append", default=[], metavar="FAMILY=DIR",
                   help="an existing checkpoint for a family (repeatable); default: built into build/bench-models")
    p.add_argument("--size", default="bench", choices=["tiny", "bench"], help="model size to build")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated calls in flight")
    p.add_argument("--requests", type=int, default=0, help="images per measurement; 0: 2 x the highest concurrency")
    p.add_argument("--modes", default=",".join(MODES), help="--batching modes to compare")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="the encoder's --batch-wait-ms")
    p.add_argument("--cache-images", type=int, default=8, help="images of the cache section")
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--torch-threads", type=int, default=0, help="the encoder's --torch-threads (0: its default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated sections to run")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "encoder.json")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.concurrency, args.requests, args.cache_images = "tiny", "2", 4, 2
        args.image_px = min(args.image_px, 224)
    args.families = [f for f in args.families.split(",") if f]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.sections = [s for s in args.sections.split(",") if s]
    args.requests = args.requests or 2 * max(args.concurrency)
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        p.error(f"unknown sections {unknown}; known: {', '.join(SECTIONS)}")
    return args


def checkpoints(args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    given = dict(spec.split("=", 1) for spec in args.model)
    for family in args.families:
        if family in given:
            yield family, Path(given[family]).resolve()
            continue
        path = MODEL_DIR / f"{family}-{args.size}"
        if not (path / "config.json").exists():
            make_model(family, path, seed=0, size=args.size)
        yield family, path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = Context(args=args, models=dict(checkpoints(args)))
    for family, model in ctx.models.items():
        ctx.items[family] = prepare_items(model, max(args.requests, args.cache_images + 1), args.image_px)
    ctx.progress = Progress(sum(section_steps(name, args, len(ctx.models)) for name in args.sections))
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "models": {family: str(path) for family, path in ctx.models.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": args.device,
                    "cuda": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None},
        "sections": {},
    }
    try:
        for name in args.sections:
            report["sections"][name] = SECTIONS[name](ctx)
    finally:
        ctx.progress.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
