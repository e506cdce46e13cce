"""Deterministic test images, encoded as files."""

from __future__ import annotations

import io

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
