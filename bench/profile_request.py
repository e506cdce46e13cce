"""Where one request's time goes, end to end, under load (image requests at concurrency 16).

    python bench/profile_request.py [--model-size bench] [--concurrency 16] [--requests 32] [--new-tokens 32]

Joins two clocks on this machine's wall clock: the client's (sent, first token, last token) and the
services' log lines. Every call is logged once at its end as `METHOD CODE <ms> ms` with the request
id the client chose (services/common/interceptors.py), and the processor passes that id on to the
encoder and the LLM, so each request gives three intervals: processor, encoder Encode, LLM
StreamGenerate. Between them:

  to processor        client send -> processor call starts (gRPC, the processor's event loop)
  preprocess          processor start -> Encode starts (media decode, HF processor, tensors to proto)
  encode              Encode, as the encoder saw it (its queue and the tower)
  to LLM              Encode ends -> LLM call starts (the LLM request: embeddings to proto)
  LLM to 1st token    LLM call starts -> first token at the client (LLM queue + prefill + 1 step + 2 hops)
  decode              first -> last token at the client (the other steps, processor detokenizing each)

What the logs cannot split, this does not: the LLM's queue vs its prefill, detokenization vs steps.
Log times have millisecond resolution.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.triptych_side import TriptychUp, run_triptych, service_env  # noqa: E402
from bench.workload import make_requests  # noqa: E402
from services.tiny_checkpoints import make_model  # noqa: E402

# "[llm] 2026-12-06 10:05:02,150 services.common.interceptors INFO [RID] /triptych.llm.v1.LlmService/StreamGenerate OK 187.7 ms"
_CALL = re.compile(r"^\[(\w+)\] (\S+ \S+) services\.common\.interceptors \w+ \[([^\]]+)\] /[\w.]+/(\w+) (\w+) ([\d.]+) ms$")
SEGMENTS = ("to processor", "preprocess", "encode", "to LLM", "LLM to 1st token", "decode")


def parse_calls(log_text: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(request id, service) -> (start, end) on the wall clock, from the calls' end lines."""
    calls = {}
    for line in log_text.splitlines():
        match = _CALL.match(line.strip())
        if not match:
            continue
        service, stamp, request_id, method, _code, ms = match.groups()
        if method not in ("StreamGenerate", "ChunkedStreamGenerate", "Encode", "StreamEncode"):
            continue
        end = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        calls[(request_id, service)] = (end - float(ms) / 1e3, end)
    return calls


def segments(calls: dict, request_id: str, sent: float, first: float, done: float) -> dict[str, float] | None:
    """One request's segments in seconds, or None if a call of it is missing from the logs."""
    try:
        (p0, _), (e0, e1), (l0, _) = (calls[(request_id, s)] for s in ("processor", "encoder", "llm"))
    except KeyError:
        return None
    return {"to processor": p0 - sent, "preprocess": e0 - p0, "encode": e1 - e0, "to LLM": l0 - e1,
            "LLM to 1st token": first - l0, "decode": done - first}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--triptych-threads", type=int, default=0, help="OMP_NUM_THREADS per service; 0: unset")
    p.add_argument("--triptych-arg", action="append", default=[], help="extra flag for `triptych up` (repeatable)")
    p.add_argument("--label", default="")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile_request.json")
    p.add_argument("--logs-dir", type=Path, default=ROOT / "bench" / "results", help="where the services' log goes")
    args = p.parse_args(argv)

    model_dir = ROOT / "build" / "bench-models" / f"qwen2_vl-{args.model_size}"
    if not (model_dir / "config.json").exists():
        make_model("qwen2_vl", model_dir, seed=0, size=args.model_size)
    log_path = args.logs_dir / "profile_request-triptych.log"
    requests = make_requests("image", args.requests)
    with TriptychUp(model_dir, log_path, service_env(args.triptych_threads), args.triptych_arg) as up:
        result, samples, wall_sent = run_triptych(up.address, requests, args.new_tokens, "image", args.concurrency,
                                                  "", lambda: None, run_tag="profile")
    calls = parse_calls(log_path.read_text())  # complete: the services have stopped (and flushed)
    rows = []
    for sample in samples:
        request_id = f"profile-{sample.index}"
        wall = wall_sent[request_id] - sample.sent  # perf_counter -> wall clock
        seg = segments(calls, request_id, wall_sent[request_id], sample.first_token + wall, sample.done + wall)
        if seg is not None:
            rows.append(seg)
    if not rows:
        raise SystemExit(f"no request could be joined with the services' log lines in {log_path}")
    total = [s.done - s.sent for s in samples]
    summary = {name: {"p50_ms": float(np.percentile([r[name] for r in rows], 50) * 1e3),
                      "mean_ms": float(np.mean([r[name] for r in rows]) * 1e3)} for name in SEGMENTS}
    report = {
        "benchmark": "one request end to end under load", "label": args.label, "model": f"qwen2_vl {args.model_size}",
        "concurrency": args.concurrency, "requests": args.requests, "joined": len(rows), "new_tokens": args.new_tokens,
        "end_to_end_p50_ms": float(np.percentile(total, 50) * 1e3), "end_to_end_mean_ms": float(np.mean(total) * 1e3),
        "output_tokens_per_s": result.output_tokens_per_s, "segments": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    mean_total = report["end_to_end_mean_ms"]
    print(f"| segment | p50 | mean | share of mean end to end ({mean_total:.0f} ms) |\n|---|---|---|---|")
    for name, figures in summary.items():
        print(f"| {name} | {figures['p50_ms']:.0f} ms | {figures['mean_ms']:.0f} ms | "
              f"{figures['mean_ms'] / mean_total:.0%} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
