"""The LLM engine in process: output tokens/s at several concurrencies, and a profile of one decode step.

    OMP_NUM_THREADS=2 .venv/bin/python bench/engine_step.py [--model DIR] [--concurrency 1 8 16]
        [--new-tokens 64] [--repeats 3] [--threads 2] [--profile-batch 16] [--engine MODULE:CLASS]

Text-only requests (random token ids, prompts of 64-192 tokens, seeded), greedy, a fixed number of
new tokens (no stop ids), on the family's stripped language model as the LLM service loads it.
Each concurrency runs 2 x concurrency requests with at most `concurrency` in flight; the best of
`--repeats` runs is reported (other processes share the CPU). `--engine` picks another engine class
with the same interface, e.g. a copy of an older one, to compare in the same run. With
`--profile-batch N`, one decode step at batch N is run under torch.profiler and its table printed.
Without `--model`, the bench-size Qwen2-VL is built into build/bench-models/qwen2_vl.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.llm.sampling import SamplingSpec
from services.models.registry import family_for
from services.tiny_checkpoints import make_model


def load(model_dir: Path):
    family = family_for(model_dir)
    model = family.load_model(model_dir, torch.float32, "cpu")
    family.strip_for_llm(model)
    return family, model


def prompts(family, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Random token ids below the special tokens' range, 64-192 long."""
    rng = torch.Generator().manual_seed(seed)
    vocab = min(family.text_config.vocab_size, 900)
    lengths = torch.randint(64, 193, (count,), generator=rng)
    return [torch.randint(10, vocab, (int(n),), generator=rng) for n in lengths]


async def run_load(engine, requests: list[torch.Tensor], concurrency: int, new_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    spec = SamplingSpec(max_new_tokens=new_tokens)
    first_token_s: list[float] = []

    async def one(token_ids):
        async with gate:
            start, count = time.perf_counter(), 0
            async for event in engine.generate(token_ids, [], spec):
                if hasattr(event, "token_id"):
                    count += 1
                    if count == 1:
                        first_token_s.append(time.perf_counter() - start)
            return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(ids) for ids in requests))
    wall_s = time.perf_counter() - start
    first_token_s.sort()
    return {"concurrency": concurrency, "requests": len(requests), "output_tokens": sum(counts),
            "wall_s": round(wall_s, 3), "tokens_per_s": round(sum(counts) / wall_s, 1),
            "ttft_p50_ms": round(1000 * first_token_s[len(first_token_s) // 2], 1)}


def profile_one_step(engine_cls, family, model, batch: int, new_tokens: int) -> None:
    """Runs `batch` requests together and profiles one decode step once all of them are in the batch."""
    from services.llm.engine import batch as batch_module

    decode, seen = batch_module.Batch.decode, {"steps": 0}

    def profiled(self):
        if len(self.rows) < batch or seen["steps"] != 3:  # a few full steps first (warm caches, allocator)
            seen["steps"] += len(self.rows) >= batch
            return decode(self)
        seen["steps"] += 1
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            decode(self)
            step_ms = 1000 * (time.perf_counter() - start)
        print(f"\none decode step at batch {len(self.rows)}, cache width {self.cache.width}: {step_ms:.1f} ms "
              "(under the profiler)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))

    batch_module.Batch.decode = profiled
    try:
        engine = engine_cls(family, model, batch, batch)
        asyncio.run(run_load(engine, prompts(family, batch, seed=1), batch, new_tokens))
        engine.stop()
    finally:
        batch_module.Batch.decode = decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile-batch", type=int, default=0)
    parser.add_argument("--engine", default="services.llm.engine:Engine")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model_dir = args.model or ROOT / "build" / "bench-models" / "qwen2_vl"
    if not (model_dir / "config.json").exists():
        make_model("qwen2_vl", model_dir, size="bench")
    module, name = args.engine.split(":")
    engine_cls = getattr(importlib.import_module(module), name)
    family, model = load(model_dir)
    results = []
    for concurrency in args.concurrency:
        runs = []
        for _ in range(args.repeats):
            engine = engine_cls(family, model, max(concurrency, 1), 2 * concurrency)
            try:
                runs.append(asyncio.run(run_load(engine, prompts(family, 2 * concurrency), concurrency,
                                                 args.new_tokens)))
            finally:
                engine.stop()
        best = max(runs, key=lambda r: r["tokens_per_s"])
        best["all_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
        results.append(best)
        print(json.dumps(best), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"engine": args.engine, "threads": args.threads, "results": results}, indent=2))
    if args.profile_batch:
        profile_one_step(engine_cls, family, model, args.profile_batch, args.new_tokens)


if __name__ == "__main__":
    main()
