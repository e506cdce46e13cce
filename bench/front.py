"""The OpenAI-compatible front against the gRPC path: one deployment, one run, the same requests.

`triptych up --front-port 0` starts processor, encoder, LLM and the HTTP front. For each request
mode and concurrency, `aiperf` (NVIDIA's benchmark client for OpenAI-compatible servers) sends
the requests to the front (`/v1/chat/completions`, streaming), then this script sends the same
requests through ProcessorService.StreamGenerate at the same concurrency (the encoder's cache off,
so neither side finds the other's images encoded). Requests come from
bench/workload.py (each its own 448x448 PNG + an instruction, or its own text prompt), as aiperf
lays them out (text part, then the image), greedy, exactly --new-tokens each (EOS ignored).

    python bench/front.py                       # bench-size Qwen2-VL, image + text, concurrency 1,4,16
    python bench/front.py --quick               # tiny model, 4 image requests, concurrency 2, 8 tokens (~2 min)

aiperf runs from its own virtual environment, build/aiperf-venv, made here on first use with pip
(`--aiperf-venv`): its dependencies conflict with the project's pins (it wants newer transformers,
huggingface_hub and pillow). It reads the model's tokenizer from the checkpoint folder and takes
token counts from the server's usage (`--use-server-token-count`). Writes one JSON (default
bench/results/front.json): per mode and concurrency, aiperf's figures for the front, ours for
gRPC, and the front's output tokens/s over gRPC's; aiperf's own exports stay in --artifacts-dir.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.triptych_side import service_env  # noqa: E402
from bench.workload import MODES, Request, Sample, make_requests, stop_process, summarize  # noqa: E402
from services.common.api.triptych.common.v1 import generation_pb2  # noqa: E402
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc  # noqa: E402
from services.common.server import channel_options  # noqa: E402

AIPERF_VERSION = "0.13.0"
MODEL_DIR = ROOT / "build" / "bench-models"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, 4 image requests, concurrency 2, "
                                                        "8 tokens (overrides the options below)")
    p.add_argument("--model-size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--model-dir", type=Path, help="an existing qwen2_vl checkpoint instead of a built one")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request (EOS ignored)")
    p.add_argument("--requests", type=int, default=0, help="requests per measurement; 0: 2 x the highest concurrency")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated in-flight request counts")
    p.add_argument("--only", default="both", choices=["image", "text", "both"])
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--triptych-arg", action="append", default=[], help="extra flag for `triptych up` (repeatable)")
    p.add_argument("--keep-encoder-cache", action="store_true",
                   help="leave the encoder's embedding cache on (by default --cache-mib 0: the second side would "
                        "otherwise find the first side's images already encoded)")
    p.add_argument("--aiperf-venv", type=Path, default=ROOT / "build" / "aiperf-venv")
    # Measured here (tiny model, text, concurrency 1): with aiperf's pooled connections every request after the
    # first waits ~40 ms more for its first token (55-75 ms against 12-36 ms on new connections) - the
    # signature of a delayed ACK meeting the client's Nagle on a reused connection - while gRPC keeps one
    # HTTP/2 connection without it. A fresh connection per request costs ~0.1 ms on loopback.
    p.add_argument("--aiperf-connection-reuse", default="never", choices=["never", "pooled"],
                   help="aiperf's --connection-reuse-strategy (default never; see the comment above)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "front.json")
    p.add_argument("--artifacts-dir", type=Path, default=ROOT / "bench" / "results" / "front-aiperf",
                   help="aiperf's datasets and exports, one folder per measurement")
    args = p.parse_args(argv)
    if args.quick:
        args.model_size, args.new_tokens, args.requests, args.concurrency, args.only = "tiny", 8, 4, "2", "image"
        args.image_px = 64
    return args


def progress(message: str) -> None:
    print(f"front bench: {message}", file=sys.stderr, flush=True)


def ensure_aiperf(venv: Path) -> Path:
    """The aiperf executable, installed into its own venv on first use: a venv without pip of its own (this
    interpreter's pip installs into it: no ensurepip) and no byte-compiling of aiperf's ~1 GB of
    dependencies at install time (Python compiles only what aiperf imports, on first use)."""
    aiperf = venv / "bin" / "aiperf"
    if aiperf.exists():
        return aiperf
    progress(f"installing aiperf {AIPERF_VERSION} into {venv} (first run only; a minute or more) ...")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet",
                    "--no-compile", f"aiperf=={AIPERF_VERSION}"], check=True)
    return aiperf


def model_dir(size: str, given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    path = MODEL_DIR / f"qwen2_vl-{size}"
    if not (path / "config.json").exists():
        from services.tiny_checkpoints import make_model

        progress(f"building the {size} qwen2_vl checkpoint in {path} ...")
        make_model("qwen2_vl", path, seed=0, size=size)
    return path


class Deployment:
    """`triptych up --front-port 0`: the processor's and the front's addresses, its log in a file."""

    def __init__(self, model: Path, log_path: Path, extra_args: list[str]):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        argv = [sys.executable, "-m", "services.cli", "up", "--model", str(model), "--port", "0", "--front-port", "0",
                *extra_args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log, text=True, cwd=ROOT,
                                     env=service_env(None))
        self.addresses: dict[str, str] = {}
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        reader.join(900)
        if set(self.addresses) != {"processor", "front"}:
            self.stop()
            raise RuntimeError(f"triptych up did not start; its log: {log_path}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            name, _, address = line.strip().partition(" listening on ")
            if address:
                self.addresses[name] = address
                progress(f"{name} listening on {address}")
            if len(self.addresses) == 2:
                return

    def stop(self) -> None:
        stop_process(self.proc)
        self._log.close()


def write_dataset(requests: list[Request], new_tokens: int, folder: Path) -> Path:
    """aiperf's single_turn JSONL: each request's text and image file, its output length, greedy, EOS ignored."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "requests.jsonl"
    with path.open("w") as f:
        for request in requests:
            row = {"text": request.text, "output_length": new_tokens, "extra": {"ignore_eos": True, "temperature": 0}}
            if request.image is not None:
                image = folder / f"image-{request.index}.png"
                image.write_bytes(request.image)
                row["image"] = str(image)
            f.write(json.dumps(row) + "\n")
    return path


def run_aiperf(aiperf: Path, front: str, model_name: str, tokenizer: Path, dataset: Path, count: int,
               concurrency: int, out_dir: Path, connection_reuse: str) -> dict:
    """aiperf profile against the front; its summary figures (seconds, tokens/s)."""
    argv = [str(aiperf), "profile", "--model", model_name, "--url", f"http://{front}", "--endpoint-type", "chat",
            "--streaming", "--input-file", str(dataset), "--custom-dataset-type", "single_turn",
            "--dataset-sampling-strategy", "sequential", "--request-count", str(count),
            "--concurrency", str(concurrency), "--warmup-request-count", "1", "--tokenizer", str(tokenizer),
            "--use-server-token-count", "--output-artifact-dir", str(out_dir), "--ui-type", "none",
            "--no-server-metrics", "--no-gpu-telemetry", "--export-outputs-json",
            "--connection-reuse-strategy", connection_reuse]
    # aiperf's offline mode looks a local tokenizer folder up in the hub cache, and fails; online, it loads
    # the folder as it is (nothing here reaches the network: the tokenizer and the dataset are local).
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd=out_dir)
    (out_dir / "aiperf-console.txt").write_text(done.stdout + done.stderr)
    export = out_dir / "profile_export_aiperf.json"
    if done.returncode != 0 or not export.exists():
        raise RuntimeError(f"aiperf failed ({done.returncode}); see {out_dir / 'aiperf-console.txt'}")
    data = json.loads(export.read_text())

    def stat(name: str, key: str, scale: float = 1.0) -> float | None:
        value = (data.get(name) or {}).get(key)
        return None if value is None else value * scale

    return {
        "side": "front_aiperf", "requests": int(stat("request_count", "avg") or 0),
        "errors": len(data.get("error_summary") or []),
        "output_tokens": int(stat("total_osl", "avg") or 0),
        "wall_s": stat("benchmark_duration", "avg"),
        "output_tokens_per_s": stat("output_token_throughput", "avg"),
        "requests_per_s": stat("request_throughput", "avg"),
        "ttft_p50_s": stat("time_to_first_token", "p50", 1e-3), "ttft_p99_s": stat("time_to_first_token", "p99", 1e-3),
        "itl_p50_s": stat("inter_token_latency", "p50", 1e-3),
        "request_latency_p50_s": stat("request_latency", "p50", 1e-3),
        "output_sequence_length_avg": stat("output_sequence_length", "avg"),
        "aiperf_export": str(export.relative_to(ROOT) if export.is_relative_to(ROOT) else export),
        "texts": [row["response_text"] for row in json.loads((out_dir / "outputs.json").read_text())["data"]],
    }


def grpc_request(request: Request, new_tokens: int) -> processor_pb2.StreamGenerateRequest:
    """The request aiperf sends, as the processor's: the text part, then the image; greedy, EOS ignored."""
    parts = [processor_pb2.ContentPart(text=request.text)]
    if request.image is not None:
        parts.append(processor_pb2.ContentPart(image=processor_pb2.Media(data=request.image)))
    return processor_pb2.StreamGenerateRequest(
        messages=[processor_pb2.ChatMessage(role="user", content=parts)],
        sampling=generation_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))


async def _grpc_side(address: str, requests: list[Request], new_tokens: int,
                     concurrency: int) -> tuple[list[Sample], float, list[str]]:
    gate = asyncio.Semaphore(concurrency)
    texts: dict[int, str] = {}
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)

        async def one(request: Request) -> Sample:
            async with gate:
                sent, first, ids, text = time.perf_counter(), None, [], []
                async for event in stub.StreamGenerate(grpc_request(request, new_tokens), timeout=3600):
                    if event.token_ids:
                        first = first or time.perf_counter()
                        ids.extend(event.token_ids)
                    text.append(event.text_delta)
                texts[request.index] = "".join(text)
                if len(ids) != new_tokens:
                    raise RuntimeError(f"request {request.index} gave {len(ids)} tokens, not {new_tokens}")
                return Sample(request.index, sent, first, time.perf_counter(), len(ids))

        await one(requests[0])  # warm-up, as aiperf's --warmup-request-count 1
        start = time.perf_counter()
        samples = await asyncio.gather(*(one(r) for r in requests))
        return list(samples), time.perf_counter() - start, [texts[r.index] for r in requests]


def run_grpc(address: str, requests: list[Request], new_tokens: int, mode: str, concurrency: int) -> dict:
    samples, wall, texts = asyncio.run(_grpc_side(address, requests, new_tokens, concurrency))
    result = summarize("grpc", mode, concurrency, samples, wall, "triptych up's own",
                       note="ProcessorService.StreamGenerate, grpc.aio, this process").as_json(False)
    return {**result, "texts": texts}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    count = args.requests or 2 * max(levels)
    modes = list(MODES) if args.only == "both" else [args.only]
    aiperf = ensure_aiperf(args.aiperf_venv)
    model = model_dir(args.model_size, args.model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    progress(f"starting triptych up --front-port 0 on {model} ...")
    up_args = [*([] if args.keep_encoder_cache else ["--cache-mib", "0"]), *args.triptych_arg]
    deployment = Deployment(model, args.artifacts_dir / "triptych-up.log", up_args)
    rows, step, steps = [], 0, len(modes) * len(levels)
    try:
        for mode in modes:
            requests = make_requests(mode, count, args.image_px)
            dataset = write_dataset(requests, args.new_tokens, args.artifacts_dir / f"dataset-{mode}")
            for level in levels:
                step += 1
                progress(f"[{step}/{steps}] {mode}, concurrency {level}: aiperf -> front ({count} requests) ...")
                out_dir = args.artifacts_dir / f"{mode}-c{level}"
                out_dir.mkdir(parents=True, exist_ok=True)
                front = run_aiperf(aiperf, deployment.addresses["front"], str(model), model, dataset, count, level,
                                   out_dir, args.aiperf_connection_reuse)
                progress(f"[{step}/{steps}] {mode}, concurrency {level}: gRPC StreamGenerate ({count} requests) ...")
                via_grpc = run_grpc(deployment.addresses["processor"], requests, args.new_tokens, mode, level)
                # The same answers both ways (greedy): aiperf's order is its own, so compared as multisets.
                same = sorted(front.pop("texts")) == sorted(via_grpc.pop("texts"))
                rows.append({"mode": mode, "concurrency": level, "front_aiperf": front, "grpc": via_grpc,
                             "front_over_grpc_output_tokens_per_s":
                                 front["output_tokens_per_s"] / via_grpc["output_tokens_per_s"],
                             "same_answers": same})
                progress(f"    front {front['output_tokens_per_s']:.1f} tok/s (TTFT p50 {front['ttft_p50_s']:.3f} s), "
                         f"gRPC {via_grpc['output_tokens_per_s']:.1f} tok/s (TTFT p50 {via_grpc['ttft_p50_s']:.3f} s)")
    finally:
        deployment.stop()
    report = {
        "benchmark": "OpenAI-compatible front (aiperf) vs gRPC StreamGenerate, one deployment, same requests",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "loadavg_1m_before": load_before[0]},
        "settings": {"model": str(model), "model_size": args.model_size, "new_tokens": args.new_tokens,
                     "requests": count, "concurrency": levels, "modes": modes, "image_px": args.image_px,
                     "greedy": True, "ignore_eos": True, "aiperf": AIPERF_VERSION, "triptych_up_args": up_args,
                     "aiperf_connection_reuse": args.aiperf_connection_reuse,
                     "quick": args.quick},
        "results": rows,
        "wall_s": time.time() - started,
    }
    args.out.write_text(json.dumps(report, indent=2))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
