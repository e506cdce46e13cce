"""The encoder's embedding cache: an LRU under a byte budget, and single flight for items in the tower.

A unit is what the tower encodes as one: one item, or for a family whose embeddings depend on their
batch (`encoder_batching == "alone"`) the group of a call's items of one modality. Its key is the
modality and its items' mm_hashes. mm_hash is the item's identity by contract (a hash of the media
bytes, the processing arguments and the model): equal hashes must mean equal media. The cache cannot
hash tensors it is not sent (a cache reference has none), so it trusts the key, and only checks that
tensors sent under a known key have the shapes and dtypes that were encoded under it
(MM_HASH_CONFLICT otherwise) -- a cheap guard against the worst kind of reuse, never a proof.

Single flight: while a unit is being encoded, a call that needs the same key waits for that
encoding instead of queueing another (in one call or across calls). If the encoding fails, every
waiter fails with the same error (no retry: a tower error or an out-of-memory would likely repeat,
and the caller decides). A cancelled waiter leaves; the encoding is withdrawn from the queue only
when no call waits for it any more.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from services.models.base import ItemEmbeddings

# (modality, mm_hashes of the unit's items)
Key = tuple[str, tuple[str, ...]]
# One item's (tensor name, shape, dtype) of each of its tensors, sorted by name.
# Tensor (name, dtype) pairs, and the embedding rows the family's schema derives from them (None where
# it derives none). Not the shapes: a processor pads an image's tensors to the largest image of its
# request (Pixtral, LLaVA-NeXT tiles), so the same image legitimately arrives in several shapes.
ItemSignature = tuple[tuple[tuple[str, str], ...], int | None]
# Per item of a unit; None for a cache reference (no tensors).
Signature = tuple[ItemSignature | None, ...]


def item_signature(tensors: dict[str, torch.Tensor], rows: int | None) -> ItemSignature:
    return tuple((name, str(t.dtype)) for name, t in sorted(tensors.items())), rows


def signatures_agree(encoded: Signature, sent: Signature) -> bool:
    """Whether the items sent (references aside) agree with those encoded under the key."""
    return len(encoded) == len(sent) and all(s is None or s == e for e, s in zip(encoded, sent))


def embeddings_bytes(embeddings: tuple[ItemEmbeddings, ...]) -> int:
    return sum(t.numel() * t.element_size() for e in embeddings for t in (e.embeddings, *e.deepstack))


@dataclass
class CacheCounters:
    """What GetStats reports of the cache (counts are items, bytes are embeddings' bytes)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    single_flight_joins: int = 0
    reference_misses: int = 0


@dataclass(frozen=True)
class Entry:
    embeddings: tuple[ItemEmbeddings, ...]  # one per item of the unit, on the CPU
    signature: Signature
    num_bytes: int


@dataclass
class Flight:
    """One encoding of a unit in the batcher, and how many calls wait for it."""

    future: Future  # -> list[ItemEmbeddings]
    signature: Signature
    waiters: int = 1


@dataclass
class EmbeddingCache:
    """LRU by key within `capacity_bytes` (0: holds nothing) plus the map of units in flight.

    Thread-safe: calls look up and join on the event loop, the batcher thread stores results.
    """

    capacity_bytes: int
    counters: CacheCounters = field(default_factory=CacheCounters)
    used_bytes: int = 0
    _entries: OrderedDict[Key, Entry] = field(default_factory=OrderedDict)
    _flights: dict[Key, Flight] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def lookup(self, key: Key) -> Entry | None:
        """The cached entry (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: Key, embeddings: tuple[ItemEmbeddings, ...], signature: Signature) -> None:
        """Stores an encoding, evicting the least recently used entries to fit; one over the whole
        budget is not stored."""
        num_bytes = embeddings_bytes(embeddings)
        with self._lock:
            if num_bytes > self.capacity_bytes:
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self.used_bytes -= old.num_bytes
            while self.used_bytes + num_bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.used_bytes -= evicted.num_bytes
                self.counters.evictions += len(evicted.embeddings)
            self._entries[key] = Entry(embeddings, signature, num_bytes)
            self.used_bytes += num_bytes

    # ---- single flight -------------------------------------------------------------------
    def join(self, key: Key) -> Flight | None:
        """The encoding of `key` in flight, now with one more waiter; None if there is none."""
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                flight.waiters += 1
            return flight

    def start(self, key: Key, future: Future, signature: Signature) -> Flight:
        """Registers a new encoding of `key`; when it succeeds its result is cached, and either way
        it stops being in flight."""
        flight = Flight(future, signature)
        with self._lock:
            self._flights[key] = flight

        def landed(done: Future) -> None:  # cached first, then out of flight: a lookup always finds one
            if not done.cancelled() and done.exception() is None:
                self.put(key, tuple(done.result()), signature)
            with self._lock:
                if self._flights.get(key) is flight:
                    del self._flights[key]

        future.add_done_callback(landed)
        return flight

    def leave(self, flight: Flight) -> bool:
        """A waiter stops waiting; True when none is left (the caller may then withdraw the encoding,
        which takes it out of flight; else it lands in the cache and a later call may still join it)."""
        with self._lock:
            flight.waiters -= 1
            return flight.waiters == 0
