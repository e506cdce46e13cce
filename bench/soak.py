"""Load and soak: the three services (separate processes, loopback) at twice their admitted concurrency,
then thousands of image requests, with every service process's resources read before and after.

    python bench/soak.py --model DIR --quick              # 300 soak requests: the CI form (tests/reliability)
    python bench/soak.py --model DIR --requests 3000      # the long form (docs/reliability/load.md)

The services run as `tests/procs.py` starts them: the encoder with no embedding cache (every request runs
the tower) and the processor sending embeddings by shared memory (services/common/shm.py: a memfd region
per Encode, claimed by the LLM), so every request exercises the encode, shm and engine paths. Admission:
the processor takes --limit calls at once (--max-concurrent-requests).

- overload: `limit` streams are admitted and decoding, then `limit` more are sent: each is refused
  (RESOURCE_EXHAUSTED, PROCESSOR_OVERLOADED, a RetryInfo) and timed; then 2 x limit closed-loop clients
  send requests until `admitted` have finished (a refused client waits REFUSED_PAUSE_S, not the hint,
  to keep the pressure at 2x): admitted latency p50/p99, refusals and their latency.
- soak: `warmup` requests, the resources read (at rest), `requests` more at `concurrency`, read again.
  Per process (processor, encoder, LLM service, its engine child): RSS, open file descriptors
  (/proc/PID/fd), threads (/proc/PID/task), shared-memory segments (memfd or /dev/shm objects its fds or
  mappings hold), and their peaks during the soak; plus any /dev/shm entry that appears named like the
  services' regions. Each request has its own image (no cache can hide a leak per request) and must
  finish with `new_tokens` tokens.
Writes JSON (--out) with the figures, the bounds, and `ok`; exits 1 when a bound is exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import grpc
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.client import build_messages
from services.common import shm
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info, retry_delay_s
from services.common.server import channel_options

PROMPT = "Describe this image."
IMAGE_PX = 56  # a few dozen patches for the tiny Qwen2-VL: the services' own work, not the tower's, dominates
REFUSED_PAUSE_S = 0.02
SETTLE_TIMEOUT_S = 15.0

# Growth allowed from after the warm-up to after the soak, per process (measured at rest). fds, threads
# and shm segments come back to where they were (a small slack for gRPC's own pollers and timers); RSS
# may move with the allocator's arenas, by at most RSS_FIXED_MIB plus RSS_PER_1000_MIB per 1000 requests
# (a leak of 8 KiB per request exceeds it at 3000 requests; seen: under 1 MiB of growth in 3000).
BOUNDS = {"fds": 4, "threads": 2, "shm_segments": 0}
RSS_FIXED_MIB, RSS_PER_1000_MIB = 16.0, 2.0


def image(seed: int, px: int = IMAGE_PX) -> bytes:
    """A noise PNG of its own per seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (px, px, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def request(seed: int, new_tokens: int, ignore_eos: bool = True, top_logprobs: int = 0) -> processor_pb2.GenerateRequest:
    """Greedy; with `top_logprobs`, each token's most likely alternatives come back (a caller's near-tie check)."""
    sampling = generation_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=ignore_eos,
                                             logprobs=top_logprobs > 0, top_logprobs=top_logprobs)
    return processor_pb2.GenerateRequest(messages=build_messages(PROMPT, [image(seed)]), sampling=sampling)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def _summary_ms(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(max(ms), 2)}


# ---- resources --------------------------------------------------------------------------------

@dataclass
class Resources:
    """One process at one moment."""

    rss_mib: float
    fds: int
    threads: int
    shm_segments: int  # distinct memfd / /dev/shm objects its descriptors or mappings hold


_SHM_PATHS = ("/memfd:", "/dev/shm/")


def shm_objects(pid: int, maps: bool = True) -> dict[int, str]:
    """The shared-memory objects (memfd regions, /dev/shm files) the process holds open or (`maps`) mapped:
    inode -> name."""
    objects = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
            if target.startswith(_SHM_PATHS):
                objects[os.stat(fd).st_ino] = target
        except OSError:  # closed meanwhile
            continue
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if maps else ():
        fields = line.split(maxsplit=5)  # address perms offset dev inode path
        if len(fields) == 6 and fields[5].startswith(_SHM_PATHS):
            objects.setdefault(int(fields[4]), fields[5])
    return objects


def resources(pid: int, maps: bool = True) -> Resources:
    rss_kib = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                   if line.startswith("VmRSS:"))
    return Resources(rss_mib=round(rss_kib / 1024, 1), fds=len(os.listdir(f"/proc/{pid}/fd")),
                     threads=len(os.listdir(f"/proc/{pid}/task")), shm_segments=len(shm_objects(pid, maps)))


def dev_shm_entries() -> set[str]:
    """Names under /dev/shm. The services make none (their regions are memfds, in no directory): an entry
    that appears during the soak and is named like theirs (shm.PREFIX, the engine's "triptych-llm-") would
    be a region leaked as a file. Other entries belong to whatever else runs on the host; listed, not bounded."""
    return {p.name for p in Path("/dev/shm").iterdir()}


def snapshot(pids: dict[str, int]) -> dict:
    return {"processes": {name: asdict(resources(pid)) for name, pid in pids.items()},
            "shm_names": {name: sorted(set(shm_objects(pid).values())) for name, pid in pids.items()}}


class PeakSampler:
    """Reads every process's fds, threads and shm segments (held open: a torch process's maps are long to
    read this often) every `interval_s` in a thread, keeping the highest of each: the encoder's regions in
    flight show that the shm path was taken."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.02):
        self.pids, self.interval_s = pids, interval_s
        self.peak = {name: {"fds": 0, "threads": 0, "shm_segments": 0} for name in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for name, pid in self.pids.items():
                try:
                    now = resources(pid, maps=False)
                except OSError:  # an fd closed between listing and reading: the next round reads it
                    continue
                for key, peak in self.peak[name].items():
                    self.peak[name][key] = max(peak, getattr(now, key))


def settled(pids: dict[str, int], baseline: dict | None = None) -> dict:
    """A snapshot at rest: once fds, threads and shm segments read the same twice 0.5 s apart (and, with a
    baseline, no more shm segments than it: claimed regions are closed by the encoder's reaper, within 1 s)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last = snapshot(pids)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = snapshot(pids)
        steady = all({k: v for k, v in now["processes"][n].items() if k != "rss_mib"}
                     == {k: v for k, v in last["processes"][n].items() if k != "rss_mib"} for n in pids)
        drained = baseline is None or all(now["processes"][n]["shm_segments"]
                                          <= baseline["processes"][n]["shm_segments"] for n in pids)
        last = now
        if steady and drained:
            break
    return last


# ---- load -------------------------------------------------------------------------------------

@dataclass
class Outcome:
    seed: int
    latency_s: float
    token_ids: list[int] | None = None  # admitted: the completion's tokens
    top_ids: list[list[int]] | None = None  # with top_logprobs: per token, the most likely token ids
    code: str = ""  # refused or failed: the status code's name
    reason: str = ""
    retry_delay_s: float | None = None


def _top_ids(completion: processor_pb2.Completion) -> list[list[int]] | None:
    return [[entry.token_id for entry in step.top_logprobs] for step in completion.logprobs] or None


async def _call(stub, seed: int, new_tokens: int, ignore_eos: bool, timeout_s: float, top_logprobs: int = 0) -> Outcome:
    start = time.perf_counter()
    try:
        reply = await stub.Generate(request(seed, new_tokens, ignore_eos, top_logprobs), timeout=timeout_s)
        return Outcome(seed, time.perf_counter() - start, list(reply.completion.token_ids), _top_ids(reply.completion))
    except grpc.aio.AioRpcError as err:
        info = error_info(err)
        return Outcome(seed, time.perf_counter() - start, code=err.code().name, reason=info.reason if info else "",
                       retry_delay_s=retry_delay_s(err))


async def _burst(address: str, limit: int, seeds: list[int], new_tokens: int, timeout_s: float,
                 top_logprobs: int) -> dict:
    """`limit` streams admitted (each has sent a token), then `limit` more sent at once and timed."""
    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        streams, starts = [], []
        for i in range(limit):
            starts.append(time.perf_counter())
            streams.append(stub.StreamGenerate(request(seeds[i % len(seeds)], new_tokens, False, top_logprobs),
                                               timeout=timeout_s))
        firsts = [await s.read() for s in streams]  # admitted, prefilled, decoding
        excess = await asyncio.gather(*(_call(stub, seeds[i % len(seeds)], new_tokens, False, timeout_s, top_logprobs)
                                        for i in range(limit)))
        admitted = []
        for i, (stream, first) in enumerate(zip(streams, firsts)):
            tokens = list(first.token_ids)
            completion = None
            while (reply := await stream.read()) is not grpc.aio.EOF:  # read() only: grpc refuses mixing styles
                tokens.extend(reply.token_ids)
                if reply.HasField("completion"):
                    completion = reply.completion
            admitted.append(Outcome(seeds[i % len(seeds)], time.perf_counter() - starts[i],
                                    list(completion.token_ids) if completion else tokens,
                                    _top_ids(completion) if completion else None))
    return {"admitted": admitted, "excess": list(excess)}


async def _closed_loop(address: str, clients: int, admitted_target: int, seeds: list[int], new_tokens: int,
                       timeout_s: float, top_logprobs: int) -> list[Outcome]:
    """`clients` callers back to back until `admitted_target` calls were admitted and finished."""
    outcomes: list[Outcome] = []
    done = asyncio.Event()

    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)

        async def client(index: int) -> None:
            sent = 0
            while not done.is_set():
                out = await _call(stub, seeds[(index + sent * clients) % len(seeds)], new_tokens, False, timeout_s,
                                  top_logprobs)
                sent += 1
                outcomes.append(out)
                if sum(o.token_ids is not None for o in outcomes) >= admitted_target:
                    done.set()
                elif out.token_ids is None:
                    await asyncio.sleep(REFUSED_PAUSE_S)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


def overload(address: str, limit: int, seeds: list[int], *, admitted: int, new_tokens: int,
             timeout_s: float = 120.0, top_logprobs: int = 0) -> dict:
    """The two phases at 2 x `limit`; every outcome kept (token ids, and with `top_logprobs` each token's
    alternatives) for the caller to check."""
    burst = asyncio.run(_burst(address, limit, seeds, new_tokens, timeout_s, top_logprobs))
    start = time.perf_counter()
    loop = asyncio.run(_closed_loop(address, 2 * limit, admitted, seeds, new_tokens, timeout_s, top_logprobs))
    wall_s = time.perf_counter() - start
    ok = [o for o in loop if o.token_ids is not None]
    refused = [o for o in loop if o.code == "RESOURCE_EXHAUSTED"]
    return {
        "limit": limit, "clients": 2 * limit, "new_tokens": new_tokens,
        "burst": {"admitted": len(burst["admitted"]),
                  "refused": sum(o.code == "RESOURCE_EXHAUSTED" for o in burst["excess"]),
                  "refusal_latency": _summary_ms([o.latency_s for o in burst["excess"]]),
                  "admitted_latency": _summary_ms([o.latency_s for o in burst["admitted"]])},
        "closed_loop": {"admitted": len(ok), "refused": len(refused), "other": len(loop) - len(ok) - len(refused),
                        "wall_s": round(wall_s, 2), "admitted_per_s": round(len(ok) / wall_s, 2),
                        "admitted_latency": _summary_ms([o.latency_s for o in ok]),
                        "refusal_latency": _summary_ms([o.latency_s for o in refused])},
        "outcomes": {"burst_admitted": burst["admitted"], "burst_excess": burst["excess"], "closed_loop": loop},
    }


# ---- soak -------------------------------------------------------------------------------------

async def _requests(address: str, first_seed: int, count: int, concurrency: int, new_tokens: int,
                    timeout_s: float, checkpoints: int, on_checkpoint) -> list[Outcome]:
    outcomes: list[Outcome] = []
    queue = iter(range(first_seed, first_seed + count))
    every = max(1, count // checkpoints) if checkpoints else 0

    async with grpc.aio.insecure_channel(address, options=channel_options()) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)

        async def worker() -> None:
            for seed in queue:  # one iterator shared by the workers: each seed once
                outcomes.append(await _call(stub, seed, new_tokens, True, timeout_s))
                if every and len(outcomes) % every == 0:
                    on_checkpoint(len(outcomes))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def rss_bound_mib(requests: int) -> float:
    return RSS_FIXED_MIB + RSS_PER_1000_MIB * requests / 1000


def soak(address: str, pids: dict[str, int], *, requests: int, warmup: int, concurrency: int, new_tokens: int,
         timeout_s: float = 120.0) -> dict:
    """Warm-up, resources at rest, `requests` more, resources at rest again; growth against BOUNDS."""
    warm = asyncio.run(_requests(address, 1_000_000, warmup, concurrency, new_tokens, timeout_s, 0, None))
    before = settled(pids)
    shm_before = dev_shm_entries()
    trend: list[dict] = []

    def sample(done: int) -> None:  # RSS along the way (not at rest): a leak climbs, a high-water mark steps once
        trend.append({"requests": done, **{n: resources(pid).rss_mib for n, pid in pids.items()}})

    start = time.perf_counter()
    with PeakSampler(pids) as sampler:
        outcomes = asyncio.run(_requests(address, 2_000_000, requests, concurrency, new_tokens, timeout_s, 10, sample))
    wall_s = time.perf_counter() - start
    after = settled(pids, before)
    new_dev_shm = sorted(dev_shm_entries() - shm_before)
    bounds = {**BOUNDS, "rss_mib": rss_bound_mib(requests)}
    growth, exceeded = {}, []
    for name in pids:
        b, a = before["processes"][name], after["processes"][name]
        growth[name] = {k: round(a[k] - b[k], 1) for k in b}
        exceeded += [f"{name} {k} +{growth[name][k]} > {bounds[k]}" for k in b if growth[name][k] > bounds[k]]
    ours = [name for name in new_dev_shm if name.startswith((shm.PREFIX, "triptych-llm-"))]
    if ours:
        exceeded.append(f"/dev/shm entries left named like the services' regions: {ours}")
    failed = [o for o in [*warm, *outcomes] if o.token_ids is None or len(o.token_ids) != new_tokens]
    if failed:
        exceeded.append(f"{len(failed)} requests failed or were short, e.g. {failed[0]}")
    ok = [o for o in outcomes if o.token_ids is not None]
    return {
        "requests": requests, "warmup": warmup, "concurrency": concurrency, "new_tokens": new_tokens,
        "wall_s": round(wall_s, 2), "requests_per_s": round(requests / wall_s, 2),
        "latency": _summary_ms([o.latency_s for o in ok]), "failed": len(failed),
        "before": before, "after": after, "growth": growth, "bounds": bounds, "peak_during": sampler.peak,
        "new_dev_shm_entries": new_dev_shm, "rss_trend_mib": trend,
        "exceeded": exceeded, "ok": not exceeded,
    }


# ---- the command ------------------------------------------------------------------------------

SERVICE_FLAGS = {"encoder": ("--cache-mib", "0"), "processor": ("--embeddings-transport", "shm")}


def start(model: Path, limit: int):
    """The three services as processes (tests/procs.py), with the flags above and processor `limit`."""
    from tests.procs import ServiceSet, start_encoder, start_llm, start_processor, wait_listening, wait_serving

    encoder, llm = start_encoder(model, *SERVICE_FLAGS["encoder"]), start_llm(model)
    processor = start_processor(model, wait_listening(encoder), wait_listening(llm), None,
                                *SERVICE_FLAGS["processor"], "--max-concurrent-requests", str(limit))
    wait_listening(processor)
    for proc in (encoder, llm, processor):
        wait_serving(proc.address)
    return ServiceSet(encoder, llm, processor)


def service_pids(services) -> dict[str, int]:
    from tests.procs import engine_pid

    return {"processor": services.processor.popen.pid, "encoder": services.encoder.popen.pid,
            "llm": services.llm.popen.pid, "llm_engine": engine_pid(services.llm.popen.pid)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a Qwen2-VL checkpoint (default: the tiny test one, built if missing)")
    p.add_argument("--quick", action="store_true", help="the CI form: 300 soak requests after 100 of warm-up")
    p.add_argument("--requests", type=int, default=3000, help="soak requests measured after the warm-up")
    p.add_argument("--warmup", type=int, default=200, help="requests before the first measurement")
    p.add_argument("--concurrency", type=int, default=4, help="soak requests in flight")
    p.add_argument("--limit", type=int, default=4, help="the processor's --max-concurrent-requests")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens per soak request (EOS ignored)")
    p.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.warmup = 300, 100
    if args.model is None:
        from tests.checkpoints import tiny_checkpoint

        args.model = tiny_checkpoint("qwen2_vl")
    services = start(args.model, args.limit)
    try:
        pids = service_pids(services)
        load = overload(services.address, args.limit, list(range(8)), admitted=8 * args.limit, new_tokens=32)
        del load["outcomes"]
        report = {"model": str(args.model), "service_flags": SERVICE_FLAGS, "overload": load,
                  "soak": soak(services.address, pids, requests=args.requests, warmup=args.warmup,
                               concurrency=args.concurrency, new_tokens=args.new_tokens)}
    finally:
        services.stop()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    s = report["soak"]
    print(json.dumps({"overload": {k: load[k] for k in ("burst", "closed_loop")},
                      "soak": {k: s[k] for k in ("requests", "requests_per_s", "latency", "growth", "exceeded")}},
                     indent=1))
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
