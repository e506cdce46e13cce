"""Throughput and latency under load: Triptych vs transformers, same machine, same run, same model,
same requests (each its own image or prompt; greedy; exactly --new-tokens each, EOS ignored).

    pip install -e '.[bench]'          # transformers serve's extras, matplotlib, tqdm
    python bench/throughput.py                                   # the full run (docs/benchmarks.md)
    python bench/throughput.py --model-size tiny --requests 4 --concurrency 1,4 --new-tokens 8 --skip-serve

Sides, per model size and request mode (image: one 448x448 PNG + an instruction; text: a prompt):
  hf_generate_sequential  (a) `model.generate` in this process, one request after another
  transformers_serve      (b) `transformers serve` (OpenAI API, HTTP, streaming) at each concurrency
  hf_generate_batch       (c) `model.generate_batch` (continuous batching, paged attention), text only
  triptych                (d) `triptych up` (three processes, loopback), gRPC StreamGenerate, each concurrency
Writes one JSON (results, ratios vs (a)/(b)/(c), token agreement with (a), threads, machine) and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import transformers  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench import plots  # noqa: E402
from bench.hf_sides import HfModel, run_generate_batch, run_sequential  # noqa: E402
from bench.serve_side import TransformersServe, unavailable_reason  # noqa: E402
from bench.triptych_side import TriptychUp, run_triptych, service_env  # noqa: E402
from bench.workload import MODES, SideResult, make_requests  # noqa: E402
from services.tiny_checkpoints import make_model  # noqa: E402

MODEL_DIR = ROOT / "build" / "bench-models"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-size", default="both", choices=["tiny", "bench", "both"])
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (EOS ignored)")
    p.add_argument("--requests", type=int, default=0, help="requests per measurement; 0: 2 x the highest concurrency")
    p.add_argument("--concurrency", default="1,4,16,32", help="comma-separated in-flight request counts")
    p.add_argument("--only", default="both", choices=["image", "text", "both"], help="request modes to run")
    p.add_argument("--skip-serve", action="store_true", help="do not run (b) transformers serve")
    p.add_argument("--skip-sequential", action="store_true", help="do not run (a) sequential generate")
    p.add_argument("--skip-generate-batch", action="store_true", help="do not run (c) generate_batch")
    p.add_argument("--hf-threads", type=int, default=os.cpu_count(),
                   help="torch threads of the in-process sides and of transformers serve (default: all cores)")
    p.add_argument("--triptych-threads", type=int, default=0,
                   help="OMP_NUM_THREADS for each Triptych service; 0: unset, each service makes its own choice")
    p.add_argument("--triptych-arg", action="append", default=[],
                   help="extra flag for `triptych up`, e.g. --triptych-arg=--max-running-requests=32 (repeatable)")
    p.add_argument("--model-dir", type=Path, help="an existing qwen2_vl checkpoint to use (one --model-size only)")
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--token-ids", action="store_true", help="keep every request's token ids in the JSON")
    p.add_argument("--label", default="", help="a note stored in the JSON (e.g. which engine was measured)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    p.add_argument("--plots-dir", type=Path, help="where the PNG plots go (default: next to --out)")
    p.add_argument("--logs-dir", type=Path, default=ROOT / "bench" / "results",
                   help="where the servers' logs go (Triptych's carry each request's id)")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def model_dir(size: str, given: Path | None) -> Path:
    if given is not None:
        return given.resolve()
    path = MODEL_DIR / f"qwen2_vl-{size}"
    if not (path / "config.json").exists():
        make_model("qwen2_vl", path, seed=0, size=size)
    return path


def parameter_counts(hf: HfModel) -> dict[str, int]:
    """Vision tower (patch embed, blocks, merger) vs language model (embeddings, layers, lm_head)."""
    visual = sum(p.numel() for p in hf.model.model.visual.parameters())
    total = sum(p.numel() for p in hf.model.parameters())
    return {"vision_tower": visual, "language_model": total - visual, "total": total}


def token_agreement(result: SideResult, reference: SideResult | None) -> dict | None:
    """How many requests got exactly the reference's greedy tokens (the deployment must not change them)."""
    if reference is None or not result.token_ids or not reference.token_ids:
        return None
    differ = [i for i, (a, b) in enumerate(zip(result.token_ids, reference.token_ids, strict=True)) if a != b]
    return {"against": reference.side, "equal": len(result.token_ids) - len(differ), "of": len(result.token_ids),
            "differing_requests": differ}


def ratios(results: list[SideResult]) -> list[dict]:
    """Triptych's output tokens/s (and TTFT) over each peer's, same model size and mode."""
    rows = []
    for ours in (r for r in results if r.side == "triptych"):
        peers = [r for r in results if r.mode == ours.mode and r.side != "triptych"]
        for peer in peers:
            if peer.side == "transformers_serve" and peer.concurrency != ours.concurrency:
                continue
            rows.append({"mode": ours.mode, "concurrency": ours.concurrency, "vs": peer.side,
                         "vs_concurrency": peer.concurrency,
                         "output_tokens_per_s": ours.output_tokens_per_s / peer.output_tokens_per_s,
                         "ttft_p50": ours.ttft_p50_s / peer.ttft_p50_s})
    return rows


def run_size(size: str, args: argparse.Namespace, modes: list[str], levels: list[int], bar: tqdm,
             serve_status: dict) -> dict:
    path = model_dir(size, args.model_dir)
    n = args.requests

    def tick() -> None:
        bar.update(1)

    results: list[SideResult] = []
    torch.set_num_threads(args.hf_threads)
    hf = HfModel(path)
    counts = parameter_counts(hf)
    sequential: dict[str, SideResult] = {}
    for mode in modes:
        requests = make_requests(mode, n, args.image_px)
        if not args.skip_sequential:
            bar.set_description(f"{size} {mode}: transformers generate, sequential")
            sequential[mode] = run_sequential(hf, requests, args.new_tokens, mode, args.hf_threads, tick)
            results.append(sequential[mode])
        if mode == "text" and not args.skip_generate_batch:
            bar.set_description(f"{size} text: transformers generate_batch")
            results.append(run_generate_batch(hf, requests, args.new_tokens, args.hf_threads, tick))
    del hf

    if serve_status["status"] == "run":
        with TransformersServe(path, args.logs_dir / f"serve-{size}.log", args.hf_threads) as serve:
            for mode in modes:
                requests = make_requests(mode, n, args.image_px)
                for level in levels:
                    bar.set_description(f"{size} {mode}: transformers serve, concurrency {level}")
                    results.append(serve.run(requests, args.new_tokens, mode, level, args.hf_threads, tick))

    threads = str(args.triptych_threads) + " per service" if args.triptych_threads else "unset (each service's own)"
    log_path = args.logs_dir / f"triptych-{size}.log"
    agreement = []
    with TriptychUp(path, log_path, service_env(args.triptych_threads), args.triptych_arg) as up:
        for mode in modes:
            requests = make_requests(mode, n, args.image_px)
            for level in levels:
                bar.set_description(f"{size} {mode}: triptych, concurrency {level}")
                result, _, _ = run_triptych(up.address, requests, args.new_tokens, mode, level, threads, tick,
                                            run_tag=f"{size}-{mode}-c{level}")
                results.append(result)
                agreement.append({"mode": mode, "concurrency": level,
                                  **(token_agreement(result, sequential.get(mode)) or {"against": None})})
    return {
        "model": {"family": "qwen2_vl", "size": size, "dir": _shown(path), "parameters": counts},
        "results": [r.as_json(args.token_ids) for r in results],
        "ratios": ratios(results),
        "triptych_token_agreement": agreement,
        "triptych_log": _shown(log_path),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["HF_HUB_OFFLINE"] = "1"
    levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
    args.requests = args.requests or 2 * max(levels)
    modes = list(MODES) if args.only == "both" else [args.only]
    sizes = ["tiny", "bench"] if args.model_size == "both" else [args.model_size]
    if args.model_dir is not None and len(sizes) != 1:
        raise SystemExit("--model-dir needs one --model-size (tiny or bench)")
    if args.skip_serve:
        serve_status = {"status": "skipped", "reason": "--skip-serve"}
    else:
        reason = unavailable_reason()
        serve_status = {"status": "unavailable", "reason": reason} if reason else {"status": "run"}
        if reason:
            print(f"warning: transformers serve not measured: {reason}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    per_size_requests = args.requests * len(modes) * (
        (0 if args.skip_sequential else 1) + len(levels) * (1 + (serve_status["status"] == "run")))
    if "text" in modes and not args.skip_generate_batch:
        per_size_requests += args.requests
    started, load_before = time.time(), os.getloadavg()
    report = {
        "benchmark": "throughput: Triptych vs transformers", "label": args.label,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "transformers": transformers.__version__, "loadavg_1m_before": load_before[0]},
        "settings": {"new_tokens": args.new_tokens, "requests": args.requests, "concurrency": levels, "modes": modes,
                     "image_px": args.image_px, "greedy": True, "ignore_eos": True, "dtype": "float32",
                     "triptych_up_args": args.triptych_arg},
        "threads": {"in_process_transformers": args.hf_threads, "transformers_serve": args.hf_threads,
                    "triptych_services": args.triptych_threads or "unset (each service's own)",
                    "benchmark_client_process": args.hf_threads},
        "transformers_serve": serve_status,
        "sizes": {},
    }
    with tqdm(total=per_size_requests * len(sizes), unit="req", dynamic_ncols=True) as bar:
        for size in sizes:
            report["sizes"][size] = run_size(size, args, modes, levels, bar, serve_status)
    if serve_status["status"] == "run":
        serve_status["status"] = "ok"
    report["wall_s"] = time.time() - started
    report["machine"]["loadavg_1m_after"] = os.getloadavg()[0]
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plots:
        report["plots"] = plots.write(report, args.plots_dir or args.out.parent)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(plots.table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
