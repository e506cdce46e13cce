"""The LLM engine: one thread owns torch and steps every running request in turn.

The asyncio side submits a request and iterates its events; a request whose
consumer goes away (cancelled RPC, deadline) is aborted and its cache freed at
the next step. Requests are prefilled as they arrive and then decoded one
token per step round-robin, so a long generation does not hold up a short one.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch
from transformers import Cache, PreTrainedModel

from services.common.errors import Internal, ResourceExhausted, TriptychError, Unavailable
from services.llm.sampling import RowSampler, SampledToken, SamplingSpec
from services.models.base import ModelFamily, PlacedEmbeddings, PrefillInputs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    finish_reason: str  # "stop" | "length"
    num_generated: int


@dataclass
class _Sequence:
    request_id: int
    token_ids: torch.Tensor  # [L] prompt
    placed: list[PlacedEmbeddings]
    sampling: SamplingSpec
    emit: Callable[[object], None]  # thread-safe push of an event to the request's queue
    generated: list[int] = field(default_factory=list)
    prefill: PrefillInputs | None = None
    cache: Cache | None = None
    sampler: RowSampler | None = None
    aborted: bool = False


def _emitter(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[object], None]:
    """A thread-safe push onto a request's queue; a consumer whose loop has closed is ignored."""

    def emit(event: object) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # loop closed: nobody is waiting any more
            pass

    return emit


class Engine:
    def __init__(self, family: ModelFamily, model: PreTrainedModel, max_running: int, max_waiting: int):
        self.family = family
        self.model = model
        self.language_model = family.language_model(model)
        self.lm_head = family.lm_head(model)
        self.embed_tokens = model.get_input_embeddings()
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._waiting: queue.Queue[_Sequence] = queue.Queue()
        self._running: list[_Sequence] = []
        self._by_id: dict[int, _Sequence] = {}
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
            seq = _Sequence(next(self._ids), token_ids, placed, sampling, emit=emit)
            self._by_id[seq.request_id] = seq
        self._waiting.put(seq)
        return seq.request_id

    def abort(self, request_id: int) -> None:
        """Frees the request's rows and cache at the next step; a no-op once it has finished."""
        with self._lock:
            seq = self._by_id.get(request_id)
        if seq is not None:
            seq.aborted = True

    # ---- asyncio side -------------------------------------------------------------------
    async def generate(self, token_ids: torch.Tensor, placed: list[PlacedEmbeddings],
                       sampling: SamplingSpec) -> AsyncIterator[SampledToken | Finished]:
        """Yields the generated tokens one by one, then a Finished event."""
        events: asyncio.Queue = asyncio.Queue()
        request_id = self.submit(token_ids, placed, sampling, _emitter(asyncio.get_running_loop(), events))
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            self.abort(request_id)  # a consumer that went away (cancelled RPC, deadline)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ends the engine thread; requests still in it fail with UNAVAILABLE.

        Joined, not left as a daemon: a thread inside torch at interpreter exit aborts the process.
        """
        self._stopped = True
        self._waiting.put(None)  # type: ignore[arg-type]  # wakes the thread
        self._thread.join(timeout_s)

    @property
    def num_in_flight(self) -> int:
        return len(self._by_id)

    # ---- engine thread ------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped:
            self._admit()
            for seq in list(self._running):
                self._step(seq)
        with self._lock:
            left = list(self._by_id.values())
        for seq in left:
            seq.emit(Unavailable("the LLM service is shutting down; retry on another replica",
                                 reason="LLM_SHUTTING_DOWN"))
            self._release(seq)

    def _admit(self) -> None:
        """Moves waiting requests to running (blocking when idle) and prefills them."""
        while len(self._running) < self.max_running:
            try:
                seq = self._waiting.get(block=not self._running)
            except queue.Empty:
                return
            if seq is None:
                return
            if seq.aborted:
                self._release(seq)
                continue
            self._running.append(seq)
            self._step(seq)

    def _step(self, seq: _Sequence) -> None:
        if seq.aborted:
            self._release(seq)
            return
        try:
            logits = self._prefill(seq) if seq.prefill is None else self._decode(seq)
            token = seq.sampler.sample(logits[0])
        except TriptychError as err:
            seq.emit(err)
            self._release(seq)
            return
        except Exception as err:  # noqa: BLE001 — a failed request must not stop the engine
            log.exception("request %d failed", seq.request_id)
            seq.emit(Internal(f"LLM engine failed: {type(err).__name__}: {err}", reason="ENGINE_ERROR"))
            self._release(seq)
            return
        seq.generated.append(token.token_id)
        seq.emit(token)
        if token.token_id in seq.sampling.stop_token_ids:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.sampling.max_new_tokens:
            self._finish(seq, "length")

    def _prefill(self, seq: _Sequence) -> torch.Tensor:
        device = self.model.device
        seq.prefill = self.family.prefill_inputs(self.model, seq.token_ids.to(device), seq.placed)
        seq.cache = self.family.new_cache(self.model)
        seq.sampler = RowSampler(seq.sampling, seq.token_ids, device)
        length = seq.token_ids.shape[0]
        kwargs = dict(
            inputs_embeds=seq.prefill.inputs_embeds,
            position_ids=seq.prefill.position_ids,
            attention_mask=torch.ones(1, length, dtype=torch.long, device=device),
            past_key_values=seq.cache,
            use_cache=True,
        )
        out = self.language_model(**(kwargs | seq.prefill.layer_kwargs))
        seq.placed = []  # the embeddings now live in the cache
        return self.lm_head(out.last_hidden_state[:, -1])  # [1, vocab]

    def _decode(self, seq: _Sequence) -> torch.Tensor:
        device = self.model.device
        cache_length = seq.cache.get_seq_length()
        last = torch.tensor([[seq.generated[-1]]], device=device)
        kwargs = dict(
            inputs_embeds=self.embed_tokens(last),
            position_ids=self.family.decode_position_ids(seq.prefill, cache_length),
            attention_mask=torch.ones(1, cache_length + 1, dtype=torch.long, device=device),
            past_key_values=seq.cache,
            use_cache=True,
        )
        out = self.language_model(**(kwargs | self.family.decode_kwargs(seq.prefill, cache_length)))
        return self.lm_head(out.last_hidden_state[:, -1])

    def _finish(self, seq: _Sequence, reason: str) -> None:
        seq.emit(Finished(reason, len(seq.generated)))
        self._release(seq)

    def _release(self, seq: _Sequence) -> None:
        seq.cache = None
        seq.prefill = None
        seq.sampler = None
        if seq in self._running:
            self._running.remove(seq)
        with self._lock:
            self._by_id.pop(seq.request_id, None)
