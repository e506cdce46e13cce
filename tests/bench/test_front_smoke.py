"""bench/front.py --quick runs end to end: aiperf against the front and the same requests through gRPC,
one deployment, one JSON with both sides' figures and the same greedy answers both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.front import AIPERF_VERSION
from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def aiperf_venv() -> Path:
    """aiperf's venv outside the clone, one per aiperf version, so that a fresh clone (CI) reuses the one
    an earlier run installed (~1 GB, over a minute to install) instead of making build/aiperf-venv again."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return Path(os.environ.get("TRIPTYCH_AIPERF_VENV") or cache / "triptych" / f"aiperf-venv-{AIPERF_VERSION}")


@pytest.mark.e2e
def test_front_bench_smoke(tmp_path):
    out = tmp_path / "front.json"
    argv = [sys.executable, "bench/front.py", "--quick", "--model-dir", str(tiny_checkpoint("qwen2_vl")),
            "--out", str(out), "--artifacts-dir", str(tmp_path / "aiperf"), "--aiperf-venv", str(aiperf_venv())]
    # ~2 min on a busy 2-core machine once aiperf is installed (its first install into build/aiperf-venv takes more).
    run = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "front bench: [1/1] image, concurrency 2" in run.stderr  # progress on stderr

    report = json.loads(out.read_text())
    assert report["settings"]["quick"] and report["settings"]["triptych_up_args"] == ["--cache-mib", "0"]
    [row] = report["results"]
    assert (row["mode"], row["concurrency"]) == ("image", 2)
    front, grpc = row["front_aiperf"], row["grpc"]
    assert front["requests"] == grpc["requests"] == 4 and front["errors"] == 0
    assert front["output_tokens"] == grpc["output_tokens"] == 32 and front["output_sequence_length_avg"] == 8
    for side in (front, grpc):
        assert side["output_tokens_per_s"] > 0 and 0 < side["ttft_p50_s"] <= side["ttft_p99_s"], side
    assert row["same_answers"] is True
    assert (ROOT / front["aiperf_export"] if not Path(front["aiperf_export"]).is_absolute()
            else Path(front["aiperf_export"])).is_file()
