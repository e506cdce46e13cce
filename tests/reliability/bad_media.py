"""Media files for the bad-input corpus, made in code (PIL, av, numpy, struct): bombs, lying headers,
odd pixel modes, clips without frames or samples. Never downloaded; deterministic."""

from __future__ import annotations

import io
import struct
import wave
import zlib
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from tests.media import image_bytes


def _pixels(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


# ---- images whose pixels are fine but unusual: every one must work ------------------------------
def mode_image(mode: str, fmt: str = "PNG", seed: int = 40, size: tuple[int, int] = (48, 40)) -> bytes:
    """An RGB noise image converted to `mode` ("CMYK", "RGBA", "LA", "P", "L", "1", "I;16")."""
    width, height = size
    rgb = Image.fromarray(_pixels(width, height, seed))
    if mode == "I;16":  # 16-bit grey: PIL's convert cannot make it, build it from a uint16 array
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        return _save(Image.fromarray(grey), fmt)
    if mode in ("RGBA", "LA"):
        alpha = Image.fromarray(np.random.default_rng(seed + 1).integers(0, 256, (height, width), dtype=np.uint8))
        image = rgb.convert(mode[:-1])
        image.putalpha(alpha)
        return _save(image, fmt)
    return _save(rgb.convert(mode), fmt)


def palette_with_transparency(seed: int = 41) -> bytes:
    """A palette PNG whose colour 0 is transparent (tRNS): PIL opens it as P with a transparency key."""
    image = Image.fromarray(_pixels(40, 40, seed)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


def animated(fmt: str, frames: int = 3, seed: int = 42) -> bytes:
    """An animated GIF / PNG (APNG) / WebP: the first frame is the image."""
    images = [Image.fromarray(_pixels(40, 32, seed + i)) for i in range(frames)]
    return _save(images[0], fmt, save_all=True, append_images=images[1:], duration=100, loop=0)


# ---- images that lie or explode --------------------------------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, idat: bytes, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A PNG with this header and this (compressed) pixel stream; nothing checks they agree."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixels."""
    return png(width, height, zlib.compress(bytes(64)))


def png_bomb(side: int) -> bytes:
    """A valid side x side 1-bit PNG of zeros: a few tens of KB that decode to side^2 pixels."""
    row = bytes(1 + (side + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    rows_per_step = max(1, (1 << 20) // len(row))
    parts = [packer.compress(row * min(rows_per_step, side - start)) for start in range(0, side, rows_per_step)]
    return png(side, side, b"".join(parts) + packer.flush(), bit_depth=1, color_type=0)


def gif_declaring(width: int, height: int) -> bytes:
    """A GIF whose logical screen (the size PIL reports) is width x height, holding one 1x1 image."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + bytes(6)  # 2-colour table
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def flat_bomb(fmt: str, side: int) -> bytes:
    """A valid side x side image of one colour: compresses to little, decodes to side^2 pixels."""
    mode = "P" if fmt == "GIF" else "RGB"
    options = {"lossless": True, "quality": 0, "method": 0} if fmt == "WEBP" else {}
    return _save(Image.new(mode, (side, side)), fmt, **options)


def wrong_magic(data: bytes, magic: bytes) -> bytes:
    """`data` with its first bytes replaced by another format's signature."""
    return magic + data[len(magic):]


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def corrupt(data: bytes, start: int = 60, length: int = 200) -> bytes:
    """`data` with `length` bytes zeroed from `start` (a PNG's pixel stream, whose CRC then fails)."""
    return data[:start] + bytes(length) + data[start + length:]


def jpeg(width: int = 64, height: int = 48, seed: int = 43) -> bytes:
    return image_bytes(width, height, seed=seed, fmt="JPEG")


# ---- video -----------------------------------------------------------------------------------
def video(frames: int, rate: Fraction | int = 4, size: tuple[int, int] = (32, 32), flat: bool = False) -> bytes:
    """An H.264 mp4 of `frames` noise frames (`flat`: black ones, which compress to almost nothing) at
    `rate` fps: Fraction(1, 1000) is a frame every 1000 s."""
    width, height = size
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate, options={"threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.zeros((height, width, 3), np.uint8) if flat else _pixels(width, height, i)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_without_frames(fmt: str = "avi", codec: str = "mpeg4") -> bytes:
    """A container with a video stream (size, rate) and not one frame: avi's header states 0 frames;
    mp4 without a frame keeps no usable video stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=4)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()
    return buf.getvalue()


# ---- audio -----------------------------------------------------------------------------------
def wav(samples: int, rate: int = 16000, seed: int = 44) -> bytes:
    """16-bit mono PCM with exactly `samples` samples (0 and 1 included)."""
    values = (np.random.default_rng(seed).uniform(-0.3, 0.3, samples) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as clip:
        clip.setnchannels(1)
        clip.setsampwidth(2)
        clip.setframerate(rate)
        clip.writeframes(values.tobytes())
    return buf.getvalue()


def wav_declaring(declared_bytes: int, samples: int = 1600) -> bytes:
    """A wav whose RIFF and data sizes claim `declared_bytes` of samples, holding `samples`."""
    data = bytearray(wav(samples))
    struct.pack_into("<I", data, 4, min(declared_bytes + 36, 0xFFFFFFFF))
    struct.pack_into("<I", data, 40, declared_bytes)
    return bytes(data)


def float_wav(values: np.ndarray, rate: int = 16000) -> bytes:
    """IEEE float32 mono wav (format 3) holding `values` as they are, NaN included."""
    payload = values.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(payload)) + b"WAVE"
            + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(payload)) + payload)
