"""bench/cpu_budget.py runs end to end on the tiny model and accounts for every service process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_cpu_budget_smoke(tmp_path):
    out = tmp_path / "cpu.json"
    argv = [sys.executable, "bench/cpu_budget.py", "--model-dir", str(tiny_checkpoint("qwen2_vl")), "--requests", "2",
            "--concurrency", "2", "--new-tokens", "4", "--out", str(out)]
    run = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    for mode in ("image", "text"):
        block = report["modes"][mode]
        per_process = block["cpu_ms_per_request"]
        assert {"processor", "encoder", "llm_service", "engine_process", "client"} <= set(per_process)
        assert per_process["engine_process"] > 0 and per_process["processor"] > 0
        assert block["total_cpu_ms_per_request"] >= sum(per_process.values()) - 0.5
