"""bench/triton.py runs end to end (--quick: tiny Qwen2-VL, 4 images, a real tritonserver) and writes the
figures docs/benchmarks.md reads: images/s and latency per backend and concurrency, and for Triton runs
where the time goes (Triton's queue / input / tower / output split, the encoder's share)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_triton_bench_smoke(tmp_path):
    out = tmp_path / "triton.json"
    argv = [sys.executable, "bench/triton.py", "--quick", "--model", str(tiny_checkpoint("qwen2_vl")),
            "--concurrency", "2", "--out", str(out)]  # 2 in flight: Triton's batcher may merge them
    run = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    report = json.loads(out.read_text())
    rows = report["results"]
    assert {(r["backend"], r["concurrency"]) for r in rows} == {
        (b, 2) for b in ("torch", "triton-http", "triton-shm")}
    for r in rows:
        assert r["images"] == 4 and r["images_per_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0, r
        assert r["images_per_s_vs_torch"] > 0, r
        if r["backend"] != "torch":
            assert 0 < r["executions_per_request"] <= 1, r
            assert r["triton_compute_infer_ms"] > 0 and r["triton_queue_ms"] >= 0, r
