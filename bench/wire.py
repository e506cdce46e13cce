"""Lean bytes on the wire: what the processor sends the encoder per image, and how long an image takes,
in tensor mode (the HF processor's float32 outputs) and media mode (the file as received; the
encoder decodes it and runs the HF processor itself). Issue goal: media mode <= 1.1x the file's size.

    python bench/wire.py                      # bench model, 448x448 photo-like JPEG and PNG, 20 images each
    python bench/wire.py --quick              # a smoke run: 2 images each, tiny checkpoint if no bench model

Per image and mode, both built as the processor builds them (decode, the family's preprocess, then
tensors or the file): the item's serialized bytes and its ratio to the file; the processor-side time
(decode + HF processor + building the item); the Encode call on a real encoder process on loopback
(serialization, parse, in media mode decode + HF processor, the tower, the reply); their sum; and
what the item's bytes alone cost on 1 and 10 Gbit/s links, which loopback hides. Every image is
distinct (seeded) and every item has its own mm_hash, so an embedding cache never answers.

Importable: `make_images`, `build_item`, `measure_wire`, `EncoderProcess` (bench/encoder.py uses them).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench.workload import stop_process  # noqa: E402
from services.common.api.triptych.common.v1 import tensor_pb2  # noqa: E402
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc  # noqa: E402
from services.common.media import MediaLimits, decode_image  # noqa: E402
from services.common.server import channel_options  # noqa: E402
from services.common.tensors import to_named  # noqa: E402
from services.models.base import IMAGE  # noqa: E402
from services.models.checkpoint import Checkpoint  # noqa: E402

FORMATS = ("jpeg", "png")
MODES = ("tensors", "media")
JPEG_QUALITY = 90  # a common camera/web export setting
LINKS_GBIT_S = (1, 10)
_LIMITS = MediaLimits(max_bytes=32 << 20, max_image_pixels=50_000_000)  # the services' defaults
BENCH_MODEL = ROOT / "build" / "bench-models" / "qwen2_vl-bench"
TINY_MODEL = ROOT / "build" / "test-models" / "qwen2_vl-seed0"


# ---- images --------------------------------------------------------------------------------------
def photo_like(px: int, seed: int) -> np.ndarray:
    """[px, px, 3] uint8 that compresses like a photo: smooth light, a few soft-edged objects, sensor noise.

    Noise alone (bench/workload.py's PNGs) does not compress at all, which would flatter tensor mode.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:px, 0:px].astype(np.float32) / px
    sky, ground = rng.uniform(60, 220, 3), rng.uniform(30, 160, 3)
    horizon = rng.uniform(0.3, 0.7)
    image = np.where((y < horizon)[..., None], sky * (1 - 0.4 * y[..., None]), ground * (0.6 + 0.5 * y[..., None]))
    for _ in range(6):  # soft discs: objects with edges and shading
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
        inside = np.clip((r - np.hypot(x - cx, y - cy)) * px / 3, 0, 1)[..., None]
        shade = rng.uniform(20, 240, 3) * (1 - 0.5 * (y[..., None] - cy))
        image = image * (1 - inside) + shade * inside
    texture = 12 * np.sin(x * rng.uniform(20, 60)) * np.cos(y * rng.uniform(20, 60))
    image = image + texture[..., None] + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def make_images(px: int = 448, seed: int = 0) -> dict[str, bytes]:
    """One photo-like image as a JPEG (quality 90) and as a PNG: format -> file bytes."""
    pixels = Image.fromarray(photo_like(px, seed))
    files = {}
    for fmt in FORMATS:
        buf = io.BytesIO()
        pixels.save(buf, format=fmt.upper(), **({"quality": JPEG_QUALITY} if fmt == "jpeg" else {}))
        files[fmt] = buf.getvalue()
    return files


# ---- the processor's side ------------------------------------------------------------------------
class ItemBuilder:
    """What the processor service does with one image before the Encode call, in either mode."""

    def __init__(self, model_dir: Path):
        self.checkpoint = Checkpoint(model_dir)
        self.family = self.checkpoint.family
        self.processor = self.family.load_processor(model_dir)
        content = [{"type": IMAGE}, {"type": "text", "text": "Describe this image in detail."}]
        self.prompt = self.family.render_chat(self.processor, [{"role": "user", "content": content}])

    def build_item(self, data: bytes, mode: str, mm_hash: str) -> encoder_pb2.MediaItem:
        """Decode and the HF processor (needed in both modes: token ids, placeholder count, positions), then
        the item: the processor's tensors, or the file as received."""
        image = decode_image(data, _LIMITS, "bench")
        (item,) = self.family.preprocess(self.processor, self.prompt, [image]).items
        if mode == "media":
            return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=mm_hash,
                                         media=encoder_pb2.EncodedMedia(data=data))
        return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=mm_hash,
                                     tensors=to_named(item.encoder_inputs))


def build_item(model_dir: Path, data: bytes, mode: str, mm_hash: str = "bench") -> encoder_pb2.MediaItem:
    """One-off form of ItemBuilder.build_item (loads the processor each call)."""
    return ItemBuilder(model_dir).build_item(data, mode, mm_hash)


# ---- the encoder ---------------------------------------------------------------------------------
class EncoderProcess:
    """`triptych serve encoder` as a child process on loopback, port 0."""

    def __init__(self, model_dir: Path, torch_threads: int = 0):
        argv = [sys.executable, "-m", "services.cli", "serve", "encoder", "--model", str(model_dir), "--port", "0",
                "--torch-threads", str(torch_threads)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        self.lines: list[str] = []
        found = threading.Event()
        self.address = ""

        def pump() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                match = re.search(r"encoder listening on (\S+)", line)
                if match and not self.address:
                    self.address = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(600) or not self.address:
            self.stop()
            raise RuntimeError("the encoder did not start:\n" + "".join(self.lines[-40:]))

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> EncoderProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- measuring -----------------------------------------------------------------------------------
@dataclass
class WireResult:
    """One image format in one mode: medians over the images."""

    format: str
    mode: str
    images: int
    file_bytes: int
    item_bytes: int  # the MediaItem as serialized in the EncodeRequest
    ratio_to_file: float
    prepare_ms: float  # processor side: decode + HF processor + building the item
    encode_call_ms: float  # the Encode RPC, one image per call: wire, parse (+ decode + HF processor), tower, reply
    total_ms: float
    link_ms: dict[str, float]  # the item's bytes alone on a link of that many Gbit/s


def measure_wire(model_dir: Path, encoder_address: str, images: int = 20, px: int = 448,
                 warmup: int = 2) -> list[WireResult]:
    """Every format x mode on `images` distinct photo-like images; modes alternate per image so that a
    machine's drift hits both alike."""
    builder = ItemBuilder(model_dir)
    fingerprint = builder.checkpoint.fingerprint
    samples: dict[tuple[str, str], list[tuple[int, int, float, float]]] = {(f, m): [] for f in FORMATS for m in MODES}
    with grpc.insecure_channel(encoder_address, options=channel_options()) as channel:
        stub = encoder_pb2_grpc.EncoderServiceStub(channel)
        for index in range(-warmup, images):
            files = make_images(px, seed=1000 + index)
            for fmt in FORMATS:
                for mode in MODES:
                    start = time.perf_counter()
                    item = builder.build_item(files[fmt], mode, mm_hash=f"wire-{index}-{fmt}-{mode}")
                    built = time.perf_counter()
                    reply = stub.Encode(encoder_pb2.EncodeRequest(model_fingerprint=fingerprint, items=[item]),
                                        timeout=300)
                    done = time.perf_counter()
                    assert reply.items[0].embeddings.shape, "the encoder answered without embeddings"
                    if index >= 0:
                        samples[fmt, mode].append((len(files[fmt]), item.ByteSize(), built - start, done - built))
    results = []
    for (fmt, mode), rows in samples.items():
        file_bytes = int(statistics.median(r[0] for r in rows))
        item_bytes = int(statistics.median(r[1] for r in rows))
        prepare_ms = statistics.median(r[2] for r in rows) * 1e3
        encode_ms = statistics.median(r[3] for r in rows) * 1e3
        results.append(WireResult(
            format=fmt, mode=mode, images=len(rows), file_bytes=file_bytes, item_bytes=item_bytes,
            ratio_to_file=round(item_bytes / file_bytes, 4), prepare_ms=round(prepare_ms, 2),
            encode_call_ms=round(encode_ms, 2), total_ms=round(prepare_ms + encode_ms, 2),
            link_ms={f"{gbit}": round(item_bytes * 8 / (gbit * 1e9) * 1e3, 3) for gbit in LINKS_GBIT_S}))
    return results


def format_table(results: list[WireResult]) -> str:
    head = "| format | mode | file bytes | item bytes | x file | prepare ms | Encode call ms | total ms | 1 Gbit/s ms | 10 Gbit/s ms |"
    rows = [head, "|" + "---|" * 10]
    for r in results:
        rows.append(f"| {r.format} | {r.mode} | {r.file_bytes} | {r.item_bytes} | {r.ratio_to_file:.3f} | "
                    f"{r.prepare_ms:.1f} | {r.encode_call_ms:.1f} | {r.total_ms:.1f} | {r.link_ms['1']:.2f} | "
                    f"{r.link_ms['10']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, help=f"a checkpoint (default {BENCH_MODEL}; --quick: it if built, "
                   f"else {TINY_MODEL})")
    p.add_argument("--images", type=int, default=20, help="distinct images per format and mode")
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--torch-threads", type=int, default=0, help="the encoder's --torch-threads")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 images, no warm-up")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    model_dir = args.model_dir or (BENCH_MODEL if BENCH_MODEL.exists() or not args.quick else TINY_MODEL)
    images, warmup = (2, 0) if args.quick else (args.images, 2)
    with EncoderProcess(model_dir, args.torch_threads) as encoder:
        results = measure_wire(model_dir, encoder.address, images=images, px=args.image_px, warmup=warmup)
    print(format_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model_dir": str(model_dir), "image_px": args.image_px,
                                        "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
