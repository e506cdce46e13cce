"""bench/throughput.py runs end to end (tiny model, 2 requests, concurrency 1 and 2, 4 new tokens,
no `transformers serve`, no generate_batch: its paged-cache warm-up alone takes ~40 s on a CPU),
writes the fields docs/benchmarks.md reads, and Triptych's greedy tokens equal transformers'."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ("output_tokens_per_s", "requests_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "wall_s")


@pytest.mark.e2e
def test_throughput_smoke(tmp_path):
    out = tmp_path / "throughput.json"
    argv = [sys.executable, "bench/throughput.py", "--model-size", "tiny", "--model-dir", str(tiny_checkpoint("qwen2_vl")),
            "--requests", "2", "--concurrency", "1,2", "--new-tokens", "4", "--skip-serve", "--skip-generate-batch",
            "--token-ids", "--no-plots", "--hf-threads", "1", "--out", str(out), "--logs-dir", str(tmp_path)]
    # ~25 s on an idle 2-core machine; the timeout leaves room for a shared one.
    run = subprocess.run(argv, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["transformers_serve"] == {"status": "skipped", "reason": "--skip-serve"}
    assert report["settings"]["new_tokens"] == 4 and report["threads"]["in_process_transformers"] == 1
    block = report["sizes"]["tiny"]
    assert block["model"]["parameters"]["vision_tower"] > 0
    results = block["results"]
    sides = {(r["side"], r["mode"], r["concurrency"]) for r in results}
    assert sides == {("hf_generate_sequential", m, None) for m in ("image", "text")} | {
        ("triptych", m, c) for m in ("image", "text") for c in (1, 2)}
    for r in results:
        assert r["requests"] == 2 and r["output_tokens"] == 8, r
        assert all(r[f] > 0 for f in FIGURES), r
        assert r["ttft_p99_s"] >= r["ttft_p50_s"]
        assert [len(ids) for ids in r["token_ids"]] == [4, 4]

    # The deployment does not change a request's answer: Triptych's greedy tokens are transformers'.
    for mode in ("image", "text"):
        reference = next(r for r in results if r["side"] == "hf_generate_sequential" and r["mode"] == mode)
        for ours in (r for r in results if r["side"] == "triptych" and r["mode"] == mode):
            assert ours["token_ids"] == reference["token_ids"], (mode, ours["concurrency"])
    assert all(a["equal"] == a["of"] == 2 for a in block["triptych_token_agreement"])
    assert {(r["vs"], r["concurrency"]) for r in block["ratios"]} == {
        ("hf_generate_sequential", c) for c in (1, 2)}
