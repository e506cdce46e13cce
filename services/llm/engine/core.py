"""The LLM engine: one thread owns torch; every step is one decode forward over all running requests.

The asyncio side submits a request and iterates its events; a request whose consumer goes away
(cancelled RPC, deadline) is aborted and leaves the batch at the next step.

A step: (1) rows that finished or were aborted leave their batch (their cache rows are dropped and
the left padding all remaining rows share is trimmed); (2) new requests are prefilled, each alone,
until the step's prompt tokens reach `max_batch_tokens` (at least one request per step), and each
one's cache is merged once into its batch; (3) one decode forward per batch (batch.py).

Why prefill alone and not chunked with the decode rows: a prefill runs the family's hooks unchanged
(Gemma 3's bidirectional image blocks, Qwen3-VL's deepstack, mRoPE positions), exactly as generate()
does, and on this CPU a prefill of a few hundred tokens (~30 ms on the bench model) costs a few decode
steps, so the running rows wait at most one step budget; `max_batch_tokens` bounds that wait.

Rows share a batch when the family gives them the same `batch_key` (normally all of them); a
family that cannot batch, or a cache whose layers batch_cache.py does not merge, gets one batch per
request, decoded in turn: batch size 1, as exact as generate().
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable
from functools import partial

import torch
from transformers import PreTrainedModel

from services.common.errors import Internal, ResourceExhausted, TriptychError, Unavailable
from services.llm.engine.batch import Batch, Finished, Row, events_until_finished
from services.llm.engine.batch_cache import can_merge
from services.llm.sampling import RowSampler, SampledToken, SamplingSpec
from services.models.base import ModelFamily, PlacedEmbeddings

log = logging.getLogger(__name__)

# ~4 prefills of a typical prompt per step: on a CPU ~100 ms of prefill for the bench model, so the
# running rows wait a few decode steps at most while a burst of new requests joins.
DEFAULT_MAX_BATCH_TOKENS = 512


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where the C library has none (musl, macOS)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


# Returns the heap's free pages to the OS when the engine goes idle. A batch's caches are re-merged as
# rows join and leave (tensors of every size up to the whole batch), and glibc keeps what they free in
# its arenas, so without this the idle engine's RSS keeps the high-water mark of its busiest moment,
# swinging by 100-400 MiB between identical loads: an operator (or an autoscaler) watching RSS could
# not tell that from a leak. Idle only: a trim takes milliseconds that a running batch should not wait.
release_free_memory = _malloc_trim()


def shutting_down() -> Unavailable:
    """What a request still in the engine (or arriving) gets when the LLM service stops."""
    return Unavailable("the LLM service is shutting down; retry on another replica", reason="LLM_SHUTTING_DOWN")


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[object], None]:
    """A thread-safe push onto a request's queue; a consumer whose loop has closed is ignored."""

    def emit(event: object) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    return emit


class Engine:
    def __init__(self, family: ModelFamily, model: PreTrainedModel, max_running: int, max_waiting: int, *,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        self.family = family
        self.model = model
        self.language_model = family.language_model(model)
        self.lm_head = family.lm_head(model)
        self.embed_tokens = model.get_input_embeddings()
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.max_batch_tokens = max_batch_tokens  # prompt tokens prefilled in one step (at least one request)
        self.batching = can_merge(family.new_cache(model))
        self._waiting: queue.Queue[Row | None] = queue.Queue()
        self._batches: dict[Hashable, Batch] = {}  # by batch key; rows that decode alone by their request id
        self._by_id: dict[int, Row] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="llm-engine", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------
    def submit(self, token_ids: torch.Tensor, placed: list[PlacedEmbeddings], sampling: SamplingSpec,
               emit: Callable[[object], None]) -> int:
        """Queues a request and returns its id. `emit`, called on the engine thread, receives its
        SampledToken events, then Finished, or a TriptychError. Full: RESOURCE_EXHAUSTED at once."""
        with self._lock:
            if len(self._by_id) >= self.max_running + self.max_waiting:
                raise ResourceExhausted(
                    f"the LLM has {len(self._by_id)} requests in flight (limit "
                    f"{self.max_running + self.max_waiting}); retry later",
                    reason="LLM_QUEUE_FULL")
            row = Row(next(self._ids), token_ids, placed, sampling, emit=emit)
            self._by_id[row.request_id] = row
        self._waiting.put(row)
        return row.request_id

    def abort(self, request_id: int) -> None:
        """Frees the request's rows and cache at the next step; a no-op once it has finished."""
        with self._lock:
            row = self._by_id.get(request_id)
        if row is not None:
            row.aborted = True

    # ---- asyncio side -------------------------------------------------------------------
    async def generate(self, token_ids: torch.Tensor, placed: list[PlacedEmbeddings],
                       sampling: SamplingSpec) -> AsyncIterator[SampledToken | Finished]:
        """Yields the generated tokens one by one, then a Finished event."""
        events: asyncio.Queue = asyncio.Queue()
        request_id = self.submit(token_ids, placed, sampling, _emitter(asyncio.get_running_loop(), events))
        try:
            async for event in events_until_finished(events):
                yield event
        finally:
            self.abort(request_id)  # a consumer that went away (cancelled RPC, deadline)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ends the engine thread; requests still in it fail with UNAVAILABLE.

        Joined, not left as a daemon: a thread inside torch at interpreter exit aborts the process.
        """
        self._stopped = True
        self._waiting.put(None)  # wakes the thread
        self._thread.join(timeout_s)

    @property
    def num_in_flight(self) -> int:
        return len(self._by_id)

    # ---- engine thread ------------------------------------------------------------------
    @property
    def _num_running(self) -> int:
        return sum(len(batch.rows) for batch in self._batches.values())

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped:
            for batch in list(self._batches.values()):
                self._settle(batch)
            self._admit()
            for batch in list(self._batches.values()):
                self._fail_on_error(batch, batch.decode)
        with self._lock:
            left = list(self._by_id.values())
        for row in left:
            row.emit(shutting_down())
            self._release(row)

    def _settle(self, batch: Batch) -> None:
        """Drops the rows that finished or were aborted; an empty batch goes."""
        gone = [row for row in batch.rows if row.done or row.aborted]
        if gone:
            self._fail_on_error(batch, partial(batch.remove, gone))
            for row in gone:
                self._release(row)
        if not batch.rows:
            self._batches.pop(batch.key, None)

    def _admit(self) -> None:
        """Prefills waiting requests (blocking when nothing runs) and merges each into its batch."""
        budget = self.max_batch_tokens
        while self._num_running < self.max_running and budget > 0:
            if not self._batches and self._waiting.empty():
                release_free_memory()  # idle: about to block until a request arrives
            try:
                row = self._waiting.get(block=not self._batches)
            except queue.Empty:
                return
            if row is None:  # stop()
                return
            if row.aborted:
                self._release(row)
                continue
            budget -= row.token_ids.shape[0]
            cache = self._prefill(row)
            if cache is None or row.done:
                self._release(row)
                continue
            key = self.family.batch_key(row.token_ids.shape[0], row.sampling.max_new_tokens) if self.batching else None
            # Within a key, the family may keep kinds of rows apart (Mllama: rows with images from text-only ones).
            key = ("alone", row.request_id) if key is None else (key, self.family.decode_group(row.prefill))
            batch = self._batches.get(key)
            if batch is None:
                self._batches[key] = Batch(key, self, row, cache)
            else:
                self._fail_on_error(batch, partial(batch.add, row, cache))

    def _prefill(self, row: Row):
        """Runs the request's prompt alone through the family's hooks and samples its first token."""
        device = self.model.device
        row.prefill_start_ns = time.time_ns()
        try:
            row.prefill = self.family.prefill_inputs(self.model, row.token_ids.to(device), row.placed)
            cache = self.family.new_cache(self.model)
            row.sampler = RowSampler(row.sampling, row.token_ids, device)
            length = row.token_ids.shape[0]
            kwargs = {
                "inputs_embeds": row.prefill.inputs_embeds,
                "position_ids": row.prefill.position_ids,
                "attention_mask": torch.ones(1, length, dtype=torch.long, device=device),
                "past_key_values": cache,
                "use_cache": True,
            }
            out = self.language_model(**(kwargs | row.prefill.layer_kwargs))
            row.placed = []  # the embeddings now live in the cache
            row.prefill = row.prefill.for_decode()  # deepstack rows, prefill masks, embeddings: prefill only
            row.length = length
            first = row.sampler.sample(self.lm_head(out.last_hidden_state[:, -1])[0])
            row.prefill_end_ns = time.time_ns()
            row.accept(first)
            return cache
        except Exception as err:  # noqa: BLE001 — a failed request must not stop the engine
            self._fail(row, err)
            return None

    def _fail_on_error(self, batch: Batch, step: Callable[[], None]) -> None:
        """Runs a batch operation; if it raises, every row of the batch fails (the batch cache is no
        longer trustworthy) and the batch goes."""
        try:
            step()
        except Exception as err:  # noqa: BLE001
            for row in batch.rows:
                self._fail(row, err)
            self._batches.pop(batch.key, None)

    def _fail(self, row: Row, err: Exception) -> None:
        if isinstance(err, TriptychError):
            row.emit(err)
        else:
            log.exception("request %d failed", row.request_id, exc_info=err)
            row.emit(Internal(f"LLM engine failed: {type(err).__name__}: {err}", reason="ENGINE_ERROR"))
        row.done = True
        self._release(row)

    def _release(self, row: Row) -> None:
        row.prefill = None
        row.sampler = None
        with self._lock:
            self._by_id.pop(row.request_id, None)
