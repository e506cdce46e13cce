"""Where the CPU goes: CPU milliseconds per request of each Triptych process, and of the client.

    python bench/cpu_budget.py [--model-size bench] [--concurrency 16] [--requests 32] [--new-tokens 128]
        [--model-dir DIR] [--out bench/results/cpu_budget.json]

Starts `triptych up`, finds its process tree (launcher, processor, encoder, LLM service, the LLM's
engine process), sends the benchmark's image requests, then its text-only requests (bench/workload.py,
greedy, EOS ignored), and reads each process's user + system CPU time from /proc before and after
each batch of requests. On a host where every service shares the same cores, throughput is bounded
by the sum of the column: cores / (CPU seconds per request) requests per second, whatever the
pipeline does. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.triptych_side import TriptychUp, run_triptych, service_env  # noqa: E402
from bench.workload import MODES, make_requests  # noqa: E402
from services.tiny_checkpoints import make_model  # noqa: E402

_ROLES = (("engine_process", "services.llm.engine_process"), ("processor", "serve processor"),
          ("encoder", "serve encoder"), ("llm_service", "serve llm"), ("launcher", " up "))


def process_tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return found


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def role(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return next((name for name, marker in _ROLES if marker in command), f"pid {pid}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-size", default="bench", choices=["tiny", "bench"])
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--model-dir", type=Path, help="an existing qwen2_vl checkpoint to use instead")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu_budget.json")
    args = p.parse_args()
    model_dir = args.model_dir or ROOT / "build" / "bench-models" / f"qwen2_vl-{args.model_size}"
    if not (model_dir / "config.json").exists():
        make_model("qwen2_vl", model_dir, size=args.model_size)
    report = {"model": str(model_dir), "concurrency": args.concurrency, "requests": args.requests,
              "new_tokens": args.new_tokens, "cores": os.cpu_count(), "modes": {}}
    with TriptychUp(model_dir, args.out.with_suffix(".log"), service_env(None), []) as up:
        pids = process_tree(up.proc.pid)
        for mode in MODES:
            requests = make_requests(mode, args.requests)
            before = {pid: cpu_seconds(pid) for pid in pids}
            client_before, wall_start = time.process_time(), time.perf_counter()
            result, _, _ = run_triptych(up.address, requests, args.new_tokens, mode, args.concurrency, "",
                                        lambda: None, run_tag=f"cpu-{mode}")
            wall_s = time.perf_counter() - wall_start
            sent = args.requests + 1  # run_triptych sends one warm-up request first
            per_request = {role(pid): 1000 * (cpu_seconds(pid) - before[pid]) / sent for pid in pids}
            per_request["client"] = 1000 * (time.process_time() - client_before) / sent
            total = sum(per_request.values())
            report["modes"][mode] = {
                "cpu_ms_per_request": {name: round(ms, 1) for name, ms in per_request.items()},
                "total_cpu_ms_per_request": round(total, 1),
                "bound_requests_per_s": round(1000 * (os.cpu_count() or 1) / total, 2),
                "measured_requests_per_s": round(result.requests_per_s, 2),
                "output_tokens_per_s": round(result.output_tokens_per_s, 1), "wall_s": round(wall_s, 2),
            }
            print(mode, json.dumps(report["modes"][mode]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
