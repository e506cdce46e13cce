"""Cross-request batching: one thread owns torch and runs queued jobs, several per tower forward.

A job is what must run in one forward: one item, or the group of a call's items of one modality for
a family whose embeddings depend on their batch (`encoder_batching == "alone"`; such a job always
runs by itself). Calls submit jobs from the event loop and get a concurrent Future each; the torch
thread takes the oldest job, adds later jobs of the same modality up to --max-batch-items /
--max-batch-patches (waiting up to --batch-wait-ms for them), runs the family's `encode` on all their
items at once (it concatenates variable-size items the way the family's tower takes them, stacks
fixed-size ones) and hands each job its rows. A cancelled job still in the queue leaves it.

Whether a forward of several jobs pays depends on the tower and the machine: on this 2-core CPU
the bench Qwen2-VL tower costs 166 ms per 448² image in a forward of eight vs 130 ms alone, and the
bench LLaVA tower 39 vs 31 ms, while a GPU forward of one image leaves the device mostly idle. So
`--batching auto` (BatchPolicy) measures seconds per patch of forwards alone and batched, per
modality, and batches only while batched forwards cost less; every PROBE_EVERY-th decision tries
the other choice, so a change (load, device) is seen.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

import torch

from services.models.base import ItemEmbeddings

BatchingMode = Literal["auto", "always", "off"]
# Runs the tower on one modality's items: one result per item (the servicer sorts failures).
RunTower = Callable[[str, list[dict[str, torch.Tensor]]], list[ItemEmbeddings]]


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor on the CPU in storage of its own: an item's rows are often a view into its forward's
    whole output, which a cached entry would otherwise keep alive (and the cache's byte count miss)."""
    tensor = tensor.cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


@dataclass
class Job:
    """Items that run in one forward, and the future their embeddings (CPU tensors) land in."""

    modality: str
    items: list[dict[str, torch.Tensor]]
    num_patches: int  # tower input rows of all items, for --max-batch-patches
    batchable: bool  # False: runs by itself (a batch-dependent family's group)
    # What becomes of the job's embeddings before they land (EVS pruning), on the torch thread.
    finish: Callable[[list[ItemEmbeddings]], list[ItemEmbeddings]] | None = None
    future: Future = field(default_factory=Future)  # -> list[ItemEmbeddings]
    enqueued_s: float = field(default_factory=time.perf_counter)


@dataclass
class _Estimate:
    """EWMA of tower seconds per patch, alone and batched, for one modality."""

    alone_s: float | None = None
    batched_s: float | None = None
    decisions: int = 0
    seen: set[bool] = field(default_factory=set)  # kinds (batched or not) whose warm-up forward was dropped


class BatchPolicy:
    """How many jobs the next forward may take, from the forwards measured so far."""

    PROBE_EVERY = 50  # a probe costs at most one forward's difference in 50
    SMOOTHING = 0.2  # weight of the newest forward in the averages

    def __init__(self, mode: BatchingMode):
        self.mode = mode
        self._estimates: dict[str, _Estimate] = {}

    def batch_pays(self, modality: str) -> bool:
        """Asked when two or more batchable jobs of `modality` wait."""
        if self.mode != "auto":
            return self.mode == "always"
        est = self._estimates.setdefault(modality, _Estimate())
        if est.alone_s is None:
            return False  # first the baseline
        if est.batched_s is None:
            return True  # then one measured batch
        est.decisions += 1
        pays = est.batched_s < est.alone_s
        if est.decisions % self.PROBE_EVERY == 0:
            return not pays
        return pays

    def record(self, modality: str, num_jobs: int, num_patches: int, seconds: float) -> None:
        """One forward of batchable jobs: `num_patches` rows in `seconds`."""
        est = self._estimates.setdefault(modality, _Estimate())
        if (num_jobs > 1) not in est.seen:  # a kind's first forward pays one-off costs (allocations, kernels)
            est.seen.add(num_jobs > 1)
            return
        per_patch = seconds / max(1, num_patches)
        old = est.alone_s if num_jobs == 1 else est.batched_s
        new = per_patch if old is None else (1 - self.SMOOTHING) * old + self.SMOOTHING * per_patch
        if num_jobs == 1:
            est.alone_s = new
        else:
            est.batched_s = new


@dataclass
class BatchCounters:
    """What GetStats reports of the forwards."""

    forwards: int = 0
    items: int = 0
    max_items_per_forward: int = 0
    forwards_by_items_log2: list[int] = field(default_factory=list)
    queue_wait_total_s: float = 0.0
    queue_wait_max_s: float = 0.0
    waited_items: int = 0
    cancelled_items: int = 0

    def add_forward(self, jobs: list[Job], started_s: float) -> None:
        num_items = sum(len(job.items) for job in jobs)
        self.forwards += 1
        self.items += num_items
        self.max_items_per_forward = max(self.max_items_per_forward, num_items)
        bucket = num_items.bit_length() - 1
        self.forwards_by_items_log2.extend([0] * (bucket + 1 - len(self.forwards_by_items_log2)))
        self.forwards_by_items_log2[bucket] += 1
        for job in jobs:
            wait_s = started_s - job.enqueued_s
            self.queue_wait_total_s += wait_s * len(job.items)
            self.queue_wait_max_s = max(self.queue_wait_max_s, wait_s)
            self.waited_items += len(job.items)


@dataclass(frozen=True)
class BatchLimits:
    mode: BatchingMode
    wait_s: float
    max_items: int
    max_patches: int


class Batcher:
    """The torch thread and its queue."""

    def __init__(self, run_tower: RunTower, limits: BatchLimits, thread_name: str = "encoder-torch", workers: int = 1):
        self._run_tower = run_tower
        self.limits = limits
        self.policy = BatchPolicy(limits.mode)
        self.counters = BatchCounters()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        # One thread owns torch; a backend that only waits on a server (Triton) runs `workers` forwards at once.
        self._threads = [threading.Thread(target=self._loop, name=f"{thread_name}-{i}" if i else thread_name, daemon=True)
                         for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed:
                raise RuntimeError("the encoder's batcher is closed")
            self._queue.append(job)
            self._cond.notify()
        return job.future

    @property
    def queued_items(self) -> int:
        """Items waiting for a forward (the metrics' queue length)."""
        with self._cond:
            return sum(len(job.items) for job in self._queue)

    def withdraw(self, future: Future) -> bool:
        """Takes the job of `future` out of the queue if it has not started (the future is cancelled);
        False if it runs or ran."""
        with self._cond:
            if not future.cancel():
                return False
            for job in self._queue:
                if job.future is future:
                    self._queue.remove(job)
                    self.counters.cancelled_items += len(job.items)
                    break
            return True

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)

    # ---- the torch thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                jobs = self._take()
            if jobs:
                self._run(jobs)

    def _take(self) -> list[Job]:
        """The oldest job plus what may join its forward (holds the lock; waiting releases it)."""
        first = self._queue[0]
        batching = self._may_batch(first)
        if batching and self.limits.wait_s > 0:
            deadline = first.enqueued_s + self.limits.wait_s
            while not self._closed and not self._full(first) and (left := deadline - time.perf_counter()) > 0:
                self._cond.wait(left)
                if not self._queue or self._queue[0] is not first:
                    return []  # the first job was withdrawn meanwhile: start over
        self._queue.popleft()
        jobs = [first]
        if batching:
            num_items, num_patches = len(first.items), first.num_patches
            for job in list(self._queue):
                if not job.batchable or job.modality != first.modality:
                    continue
                if (num_items + len(job.items) > self.limits.max_items
                        or num_patches + job.num_patches > self.limits.max_patches):
                    break
                self._queue.remove(job)
                jobs.append(job)
                num_items += len(job.items)
                num_patches += job.num_patches
        # A job cancelled after its call last looked is dropped here (set_running_or_notify_cancel: False).
        return [job for job in jobs if job.future.set_running_or_notify_cancel()]

    def _may_batch(self, first: Job) -> bool:
        """Whether `first`'s forward may take (or, with --batch-wait-ms, wait for) more jobs."""
        if not first.batchable or self.limits.mode == "off" or self.limits.max_items <= 1:
            return False
        waiting = any(job is not first and job.batchable and job.modality == first.modality for job in self._queue)
        if not waiting and self.limits.wait_s == 0:
            return False  # nothing to batch with, and no waiting for more: not a decision
        return self.policy.batch_pays(first.modality)

    def _full(self, first: Job) -> bool:
        same = [job for job in self._queue if job.batchable and job.modality == first.modality]
        return (sum(len(job.items) for job in same) >= self.limits.max_items
                or sum(job.num_patches for job in same) >= self.limits.max_patches)

    def _run(self, jobs: list[Job]) -> None:
        started_s = time.perf_counter()
        items = [item for job in jobs for item in job.items]
        try:
            out = self._run_tower(jobs[0].modality, items)
            out = [ItemEmbeddings(embeddings=_owned(e.embeddings), deepstack=tuple(_owned(d) for d in e.deepstack),
                                  cross_attention=e.cross_attention) for e in out]
        except BaseException as err:  # noqa: BLE001 -- every job of the forward fails with it
            for job in jobs:
                job.future.set_exception(err)
            return
        seconds = time.perf_counter() - started_s
        with self._cond:
            self.counters.add_forward(jobs, started_s)
            if jobs[0].batchable:
                self.policy.record(jobs[0].modality, len(jobs), sum(job.num_patches for job in jobs), seconds)
        start = 0
        for job in jobs:
            rows = out[start:start + len(job.items)]
            start += len(job.items)
            try:
                job.future.set_result(job.finish(rows) if job.finish else rows)
            except BaseException as err:  # noqa: BLE001 -- this job's own step failed, not the forward
                job.future.set_exception(err)
