"""bench/local_encoder.py runs end to end in --quick mode (tiny model, two `triptych up` deployments)
and writes the figures the choice of --local-encode-max-patches reads."""

from __future__ import annotations

import json

import pytest

from bench.local_encoder import main
from tests.checkpoints import tiny_checkpoint


@pytest.mark.e2e
def test_local_encoder_bench_quick(tmp_path):
    out = tmp_path / "local_encoder.json"
    assert main(["--quick", "--model-dir", str(tiny_checkpoint("qwen2_vl")), "--out", str(out),
                 "--logs-dir", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    cells = {(r["mode"], r["image_px"], r["concurrency"]) for r in report["results"]}
    assert cells == {(mode, 112, c) for mode in ("service", "local") for c in (1, 2)}
    assert all(r["requests"] == 2 and 0 < r["ttft_p50_s"] <= r["ttft_p90_s"] for r in report["results"])
    assert report["results"][0]["patches"] == report["settings"]["local_threshold_patches"] == 64
    # The two deployments differ where they should: every image stayed in the local one's processor.
    assert report["encoder_calls"]["local"] == 0 < report["encoder_calls"]["service"]
    assert {(r["image_px"], r["concurrency"]) for r in report["ratios"]} == {(112, 1), (112, 2)}
