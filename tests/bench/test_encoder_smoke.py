"""bench/encoder.py runs end to end (--quick: tiny Qwen2-VL and LLaVA, concurrency 2, 4 images) and
writes the figures docs/benchmarks.md reads: images/s per batching mode and concurrency, items per
forward, queue wait, and the cache's warm vs cold latency."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_encoder_bench_smoke(tmp_path):
    out = tmp_path / "encoder.json"
    argv = [sys.executable, "bench/encoder.py", "--quick", "--model", f"qwen2_vl={tiny_checkpoint('qwen2_vl')}",
            "--model", f"llava={tiny_checkpoint('llava')}", "--torch-threads", "1", "--out", str(out),
            "--sections", "batching,cache,wire"]  # transport and pool have their own smoke tests
    run = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    report = json.loads(out.read_text())
    batching = report["sections"]["batching"]["results"]
    assert {(r["family"], r["mode"], r["concurrency"]) for r in batching} == {
        (f, m, 2) for f in ("qwen2_vl", "llava") for m in ("off", "auto", "always")}
    for r in batching:
        assert r["images"] == 4 and r["images_per_s"] > 0 and r["latency_p99_s"] >= r["latency_p50_s"] > 0, r
        assert r["forwards"] >= 1 and r["items_per_forward_mean"] >= 1 and r["queue_wait_mean_ms"] >= 0, r
        if r["mode"] == "off":
            assert r["items_per_forward_max"] == 1, r
    assert len(report["sections"]["batching"]["speedup_vs_off"]) == 4  # auto and always, per family
    for r in report["sections"]["cache"]["results"]:
        assert r["images"] == 2 and r["cold_p50_s"] > 0 and r["warm_p50_s"] > 0 and r["reference_p50_s"] > 0, r
        assert r["cache"]["hits"] == 4 and r["cache"]["entries"] == 3, r
    wire = report["sections"]["wire"]["results"]
    assert {(r["format"], r["mode"]) for r in wire} == {(f, m) for f in ("jpeg", "png") for m in ("tensors", "media")}
