"""bench/transport.py runs end to end (--quick: 1 and 16 MB, one repeat) and reports every mode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_transport_smoke(tmp_path):
    out = tmp_path / "transport.json"
    run = subprocess.run([sys.executable, "bench/transport.py", "--quick", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    got = {(r["mode"], r["size_mb"]) for r in report["results"]}
    assert got == {(mode, size) for mode in ("inline", "chunked", "shm") for size in (1, 16)}
    assert all(r["gb_per_s"] > 0 and r["bytes"] == r["size_mb"] << 20 for r in report["results"])
