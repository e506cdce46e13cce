"""The benchmark's requests and what is measured of each: one workload, sent to every side alike.

Each request is its own: image requests carry a distinct 448x448 PNG (seeded noise) and the same
instruction; text-only requests carry distinct prompts of different lengths (seeded words). Every
side decodes greedily, exactly `new_tokens` tokens, never stopping at EOS.
"""

from __future__ import annotations

import io
import random
import signal
import subprocess
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

IMAGE_PROMPT = "Describe this image in detail."
MODES = ("image", "text")
# Text-only prompts: 40-120 words -> roughly 60-200 tokens with the tiny BPE vocabulary.
TEXT_WORDS = (40, 120)
_WORDS = ("the", "model", "image", "story", "robot", "paints", "a", "blue", "circle", "under", "table",
          "explain", "difference", "between", "processor", "question", "answer", "short", "bright", "sky")


@dataclass(frozen=True)
class Request:
    """One user turn: text, and at most one image (PNG bytes)."""

    index: int
    text: str
    image: bytes | None


def make_requests(mode: str, count: int, image_px: int = 448) -> list[Request]:
    if mode == "image":
        return [Request(i, IMAGE_PROMPT, _png(image_px, seed=i)) for i in range(count)]
    if mode == "text":
        return [Request(i, _text(seed=i), None) for i in range(count)]
    raise ValueError(f"mode is {mode!r}; use one of {MODES}")


def _png(size: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _text(seed: int) -> str:
    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(rng.randint(*TEXT_WORDS))]
    return f"Request {seed}: " + " ".join(words) + ". Continue the text."


@dataclass
class Sample:
    """One request as its client saw it: seconds on one clock (time.perf_counter)."""

    index: int
    sent: float
    first_token: float
    done: float
    output_tokens: int
    token_ids: list[int] = field(default_factory=list)  # empty where the side does not return ids


@dataclass
class SideResult:
    """One side at one concurrency: the figures the benchmark reports."""

    side: str
    mode: str
    concurrency: int | None  # None: the side takes all requests at once, or one after another
    requests: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    torch_threads: str
    note: str = ""
    token_ids: list[list[int]] = field(default_factory=list)

    def as_json(self, with_tokens: bool) -> dict:
        data = asdict(self)
        if not with_tokens:
            data.pop("token_ids")
        return data


def summarize(side: str, mode: str, concurrency: int | None, samples: list[Sample], wall_s: float,
              torch_threads: str, note: str = "") -> SideResult:
    samples = sorted(samples, key=lambda s: s.index)
    ttft = np.array([s.first_token - s.sent for s in samples])
    tpot = np.array([(s.done - s.first_token) / (s.output_tokens - 1) for s in samples if s.output_tokens > 1])
    tokens = sum(s.output_tokens for s in samples)
    return SideResult(
        side=side, mode=mode, concurrency=concurrency, requests=len(samples), output_tokens=tokens, wall_s=wall_s,
        output_tokens_per_s=tokens / wall_s, requests_per_s=len(samples) / wall_s,
        ttft_p50_s=float(np.percentile(ttft, 50)), ttft_p99_s=float(np.percentile(ttft, 99)),
        tpot_p50_s=float(np.percentile(tpot, 50)) if len(tpot) else float("nan"),
        torch_threads=torch_threads, note=note, token_ids=[s.token_ids for s in samples],
    )


def stop_process(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (a server finishes what it is doing), then SIGKILL if it has not exited in `timeout_s`."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
