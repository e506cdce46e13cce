"""One-image request latency: the three services (separate processes, loopback) vs the whole
model in transformers in this process. Same model, same inputs, same machine, one run.

    .venv/bin/python bench/latency.py [--size tiny|bench] [--runs 20] [--out bench/results/latency.json]

Writes JSON with the medians, their ratio, and the embedding bytes sent per image.
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
import time
from pathlib import Path

import grpc
import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.client import build_messages  # noqa: E402
from services.common.api.triptych.common.v1 import generation_pb2  # noqa: E402
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc  # noqa: E402
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc  # noqa: E402
from services.common.server import channel_options  # noqa: E402
from services.tiny_checkpoints import make_model  # noqa: E402

PROMPT = "Describe this image in detail."


def _image(size: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _time(fn, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_services(model_dir: Path, image: bytes, max_new_tokens: int, runs: int) -> dict:
    up = subprocess.Popen([sys.executable, "-m", "services.cli", "up", "--model", str(model_dir), "--port", "0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    try:
        for line in up.stdout:
            lines.append(line)
            if line.startswith("processor listening on "):
                break
        else:
            raise RuntimeError("triptych up failed:\n" + "".join(lines))
        address = line.split()[-1]
        encoder_addr = re.search(r"\[encoder\] encoder listening on (\S+)", "".join(lines)).group(1)
        sampling = generation_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        request = processor_pb2.GenerateRequest(messages=build_messages(PROMPT, [image]), sampling=sampling)
        with (grpc.insecure_channel(address, options=channel_options()) as channel,
              grpc.insecure_channel(encoder_addr, options=channel_options()) as enc_channel):
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            times = _time(lambda: stub.Generate(request, timeout=120), runs)
            pre = stub.Preprocess(processor_pb2.PreprocessRequest(messages=request.messages), timeout=60)
            encoded = encoder_pb2_grpc.EncoderServiceStub(enc_channel).Encode(pre.encode_request, timeout=60)
            tokens = stub.Generate(request, timeout=120).completion
        item = encoded.items[0]
        return {
            "median_s": statistics.median(times), "min_s": min(times), "runs": runs,
            "prompt_tokens": tokens.prompt_tokens, "completion_tokens": tokens.completion_tokens,
            "embedding_rows": item.embeddings.shape[0], "hidden_size": item.embeddings.shape[1],
            "embedding_bytes_per_image": len(item.embeddings.data),
            "encode_request_bytes": pre.encode_request.ByteSize(),
        }
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


def bench_transformers(model_dir: Path, image: bytes, max_new_tokens: int, runs: int) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def run():
        pil = Image.open(io.BytesIO(image))
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                             add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[pil], return_tensors="pt")
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)

    times = _time(run, runs)
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="tiny", choices=["tiny", "bench"])
    parser.add_argument("--image-px", type=int, default=448)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latency.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = ROOT / "build" / "bench-models" / f"qwen2_vl-{args.size}"
    if not (model_dir / "config.json").exists():
        make_model("qwen2_vl", model_dir, seed=0, size=args.size)
    image = _image(args.image_px)
    ours = bench_services(model_dir, image, args.max_new_tokens, args.runs)
    theirs = bench_transformers(model_dir, image, args.max_new_tokens, args.runs)
    result = {
        "benchmark": "one-image request latency", "model": f"qwen2_vl {args.size} (random weights)",
        "image_px": args.image_px, "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "triptych_services": ours, "transformers_in_process": theirs,
        "ratio_services_over_transformers": ours["median_s"] / theirs["median_s"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
