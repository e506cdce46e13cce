"""bench/encoder_pool.py --quick runs end to end on the tiny model and reports the fields the lead's
bench/encoder.py reads: TTFT cold vs warm of a repeated image, and 0 failed requests in the kill test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_encoder_pool_bench_quick(tmp_path):
    out = tmp_path / "encoder_pool.json"
    argv = [sys.executable, "bench/encoder_pool.py", "--quick", "--model-dir", str(tiny_checkpoint("qwen2_vl")),
            "--out", str(out)]
    run = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)  # ~60 s idle
    assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
    report = json.loads(out.read_text())
    ttft = report["repeated_image_ttft"]
    assert len(ttft["cold_ttft_s"]) == len(ttft["warm_ttft_s"]) == ttft["pairs"] > 0
    assert ttft["warm_over_cold"] > 0 and isinstance(ttft["cache_references"], bool)
    kill = report["kill_test"]
    assert kill["failed_requests"] == 0 and kill["answered"] == kill["requests"], kill
