"""A real tritonserver on this machine's CPU, from scripts/setup_triton.sh's unpacked nvidia-pytriton wheel
(the tests' and bench/triton.py's).

Tests never skip for want of it: a missing build/triton/env fails them (TritonMissing), naming the
script to run (scripts/test.sh runs it).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV_FILE = ROOT / "build" / "triton" / "env"


class TritonMissing(RuntimeError):
    """scripts/setup_triton.sh has not run here."""


def triton_env() -> dict[str, str]:
    """The environment tritonserver and its Python backend stub need (DESIGN.md §4.5)."""
    if not ENV_FILE.is_file():
        raise TritonMissing(f"{ENV_FILE} is missing: run scripts/setup_triton.sh (scripts/test.sh runs it) to unpack "
                    "tritonserver from the nvidia-pytriton wheel")
    pairs = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines() if "=" in line)
    if not Path(pairs["TRITONSERVER"]).is_file():
        raise TritonMissing(f"{pairs['TRITONSERVER']} is missing: run scripts/setup_triton.sh again")
    return pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """tritonserver over `repo` on an HTTP port of its own (gRPC and metrics off); restartable on that port."""

    def __init__(self, repo: Path, log_path: Path):
        self.repo = repo
        self.log_path = log_path
        self.port = free_port()
        self.popen: subprocess.Popen | None = None
        pairs = triton_env()
        self.binary = pairs.pop("TRITONSERVER")
        self.backends = pairs.pop("TRITON_BACKEND_DIR")
        self.env = {**os.environ, **pairs, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180) -> TritonServer:
        with self.log_path.open("a") as log:
            self.popen = subprocess.Popen(
                [self.binary, "--model-repository", str(self.repo), "--backend-directory", self.backends,
                 "--http-port", str(self.port), "--allow-grpc", "false", "--allow-metrics", "false",
                 "--exit-timeout-secs", "5"], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.popen.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"tritonserver not ready after {timeout_s}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen = None

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
