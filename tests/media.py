"""Deterministic test media (images, video clips, audio clips), encoded as files."""

from __future__ import annotations

import io

import av
import numpy as np
from PIL import Image


def image_bytes(width: int, height: int, seed: int = 0, kind: str = "noise", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "noise":
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    else:  # smooth gradient with a seeded tint
        y, x = np.mgrid[0:height, 0:width]
        tint = rng.integers(0, 256, 3)
        pixels = np.stack([(x * 255 // max(1, width - 1) + tint[0]) % 256,
                           (y * 255 // max(1, height - 1) + tint[1]) % 256,
                           np.full_like(x, tint[2])], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def video_bytes(seconds: float = 2.0, fps: int = 8, width: int = 96, height: int = 64, seed: int = 0,
                motion: bool = True, fmt: str = "mp4", codec: str = "libx264", gop: int | None = None) -> bytes:
    """A clip of a square crossing a seeded background (`motion=False`: the square stands still),
    encoded with av. H.264 in mp4 by default (B-frames included), or e.g. ("webm", "libvpx-vp9")."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    color = rng.integers(0, 256, 3, dtype=np.uint8)
    side = max(4, min(width, height) // 4)
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        # One encoder thread: with several, x264 output varied between calls under load.
        stream = container.add_stream(codec, rate=fps, options={"threads": "1"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        frames = max(1, round(seconds * fps))
        for i in range(frames):
            pixels = background.copy()
            x = (i * max(1, (width - side) // frames) if motion else 0) % (width - side + 1)
            y = (i * max(1, (height - side) // frames) if motion else 0) % (height - side + 1)
            pixels[y : y + side, x : x + side] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def audio_bytes(seconds: float = 1.0, rate: int = 16000, seed: int = 0, fmt: str = "wav", codec: str = "pcm_s16le",
                channels: int = 1) -> bytes:
    """A clip of seeded tones (a different chord per seed), encoded with av: 16-bit wav by default."""
    rng = np.random.default_rng(seed)
    t = np.arange(max(1, round(seconds * rate))) / rate
    signal = sum(0.2 * np.sin(2 * np.pi * f * t) for f in rng.uniform(150, 2000, 3)).astype(np.float32)
    layout = "mono" if channels == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.layout = layout
        planar = np.tile(signal, (channels, 1))
        for start in range(0, signal.size, 1024):
            frame = av.AudioFrame.from_ndarray(planar[:, start : start + 1024].copy(), format="fltp", layout=layout)
            frame.sample_rate = rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
