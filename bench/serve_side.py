"""(b) `transformers serve`: transformers' own OpenAI-compatible HTTP server, as a user starts it
on a local checkpoint folder (offline), sent the same requests as Triptych (images as base64 data
URLs), streaming, at the same concurrency. In transformers 5.23 it generates for a VLM one request
at a time (continuous batching only for text LLMs: `use_continuous_batching` in cli/serving/utils.py).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.hf_sides import NO_EOS
from bench.workload import Request, Sample, SideResult, stop_process, summarize

# What `transformers serve` imports beyond transformers itself (its `serving` extra).
SERVE_MODULES = ("fastapi", "uvicorn", "openai", "starlette", "pydantic")
_LAUNCH = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"


def unavailable_reason() -> str | None:
    """Why `transformers serve` cannot run in this Python, or None if it can."""
    missing = []
    for name in SERVE_MODULES:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        return (f"`transformers serve` needs {', '.join(missing)} (pip install -e '.[bench]', or "
                f"'transformers[serving]'); not installed in {sys.executable}")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TransformersServe:
    """`transformers serve DIR` on loopback; its output kept in `log_path`."""

    def __init__(self, model_dir: Path, log_path: Path, threads: int):
        self.model = str(model_dir)
        self.port = _free_port()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        argv = [sys.executable, "-c", _LAUNCH, "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port),
                "--device", "cpu", "--dtype", "float32"]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready(timeout_s=600)
        gen = json.loads((model_dir / "generation_config.json").read_text())
        self.pad_token_id = gen.get("pad_token_id")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                # /health, not /v1/models: that one scans the hub cache and fails (500) offline.
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve did not answer in {timeout_s:.0f} s; see {self.log_path}")

    def body(self, request: Request, new_tokens: int) -> bytes:
        content: list[dict] = []
        if request.image is not None:
            url = "data:image/png;base64," + base64.b64encode(request.image).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": request.text})
        # The OpenAI API has no ignore_eos; `transformers serve` takes a whole GenerationConfig as JSON
        # instead: greedy, exactly new_tokens, no EOS to stop at (as the other sides).
        generation = {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": NO_EOS,
                      "pad_token_id": self.pad_token_id}
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": content}], "stream": True,
                           "max_tokens": new_tokens, "generation_config": json.dumps(generation)}).encode()

    def one(self, request: Request, new_tokens: int) -> Sample:
        http = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/chat/completions",
                                      data=self.body(request, new_tokens),
                                      headers={"Content-Type": "application/json"})
        sent, first, usage = time.perf_counter(), None, None
        last = sent
        with urllib.request.urlopen(http, timeout=3600) as reply:
            for line in reply:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    last = time.perf_counter()
                    first = first or last
                usage = chunk.get("usage") or usage
        tokens = (usage or {}).get("completion_tokens", 0)
        if first is None or tokens != new_tokens:
            raise RuntimeError(f"transformers serve gave {tokens} tokens for request {request.index}, not {new_tokens}")
        return Sample(request.index, sent, first, last, tokens)

    def run(self, requests: list[Request], new_tokens: int, mode: str, concurrency: int, threads: int,
            tick: Callable[[], None]) -> SideResult:
        self.one(requests[0], new_tokens)  # warm-up

        def timed(request: Request) -> Sample:
            sample = self.one(request, new_tokens)
            tick()
            return sample

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            samples = list(pool.map(timed, requests))
        wall = time.perf_counter() - start
        return summarize("transformers_serve", mode, concurrency, samples, wall, f"{threads} (server process)",
                         note="OpenAI API over HTTP, streaming; token times are those of text chunks")

    def stop(self) -> None:
        stop_process(self.proc, timeout_s=30)
        self._log.close()

    def __enter__(self) -> TransformersServe:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
