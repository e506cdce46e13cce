"""A decode batch: its rows (one per request) and their merged cache, stepped by one forward."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import Cache

from services.llm.engine.batch_cache import BatchCache
from services.llm.sampling import RowSampler, SampledToken, SamplingSpec
from services.models.base import PlacedEmbeddings, PrefillInputs

if TYPE_CHECKING:
    from services.llm.engine.core import Engine


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    finish_reason: str  # "stop" | "length"
    num_generated: int
    # When the request was queued, its prefill began and ended, and it finished: time.time_ns() of the
    # engine's process, the clock of the service too (trace spans of the queue, prefill and decode loop).
    queued_ns: int = 0
    prefill_start_ns: int = 0
    prefill_end_ns: int = 0
    end_ns: int = 0


async def events_until_finished(events: asyncio.Queue) -> AsyncIterator[SampledToken | Finished]:
    """A request's events as its consumer reads them: tokens, then Finished; an error is raised."""
    while True:
        event = await events.get()
        if isinstance(event, BaseException):
            raise event
        yield event
        if isinstance(event, Finished):
            return


@dataclass
class Row:
    """One request in the engine: what it asked for and where its decoding stands."""

    request_id: int
    token_ids: torch.Tensor  # [L] prompt
    placed: list[PlacedEmbeddings]
    sampling: SamplingSpec
    emit: Callable[[object], None]  # thread-safe push of an event to the request's queue
    generated: list[int] = field(default_factory=list)
    prefill: PrefillInputs | None = None  # kept for its decode positions (mRoPE delta)
    sampler: RowSampler | None = None
    length: int = 0  # real tokens in the cache (padding not counted): the next token's position
    aborted: bool = False  # set by any thread; the row leaves at the next step
    done: bool = False  # finished, failed or aborted: leaves at the next step
    queued_ns: int = field(default_factory=time.time_ns)  # stage times, as Finished reports them
    prefill_start_ns: int = 0
    prefill_end_ns: int = 0

    def accept(self, token: SampledToken) -> None:
        """Emits a sampled token and finishes the request on a stop id or at max_new_tokens."""
        self.generated.append(token.token_id)
        self.emit(token)
        if token.token_id in self.sampling.stop_token_ids:
            self._finish("stop")
        elif len(self.generated) >= self.sampling.max_new_tokens:
            self._finish("length")

    def _finish(self, reason: str) -> None:
        self.emit(Finished(reason, len(self.generated), self.queued_ns, self.prefill_start_ns, self.prefill_end_ns,
                           time.time_ns()))
        self.done = True


class Batch:
    """Rows that decode together: row i of `cache` is `rows[i]`."""

    def __init__(self, key: Hashable, engine: Engine, row: Row, cache: Cache):
        self.key = key
        self.engine = engine
        self.rows = [row]
        self.cache = BatchCache(cache, row.length, engine.model.device, engine.family.fixed_cache_layers)

    def add(self, row: Row, cache: Cache) -> None:
        """Merges a prefilled request's cache as the last row (once: decode steps never re-stack)."""
        self.rows.append(row)  # first: if the merge fails, the engine fails this row with the batch
        self.cache.append(cache, row.length)

    def remove(self, rows: list[Row]) -> None:
        keep = [i for i, row in enumerate(self.rows) if row not in rows]
        self.rows = [self.rows[i] for i in keep]
        if self.rows:
            self.cache.select(keep)

    def decode(self) -> None:
        """One forward over every row that still decodes: each feeds its last token at its own position,
        then samples its next token from its own logits with its own sampler."""
        rows = self.rows  # the engine settled finished and aborted rows before this step
        engine, family = self.engine, self.engine.family
        device = engine.model.device
        last = torch.tensor([[row.generated[-1]] for row in rows], device=device)  # [B, 1]
        prefills, lengths = [row.prefill for row in rows], [row.length for row in rows]
        kwargs = {
            "inputs_embeds": engine.embed_tokens(last),  # [B, 1, H]
            "position_ids": family.batch_decode_position_ids(prefills, lengths),  # [B, 1] or [3, B, 1]
            "attention_mask": self.cache.step_mask(),  # [B, width + 1]: left padding masked
            "past_key_values": self.cache.cache,
            "use_cache": True,
        }
        kwargs |= family.decode_token_kwargs(engine.model, last)
        out = engine.language_model(**(kwargs | family.batch_decode_kwargs(prefills, lengths)))
        self.cache.advance()
        logits = engine.lm_head(out.last_hidden_state[:, -1])  # [B, vocab]
        for i, row in enumerate(rows):
            row.length += 1
            if not row.aborted:
                row.accept(row.sampler.sample(logits[i]))
