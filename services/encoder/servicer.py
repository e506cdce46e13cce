"""EncoderService: processed media items in, one embedding set per item out.

An Encode runs in steps, none on the event loop: parse and check every item against the family's
schema (a parse thread: proto -> tensors, or a media item's file -> decode + HF processor in
media_inputs.py; shapes and per-item budget; a bad item fails its request before any of it joins a
batch); then per unit (one item, or a batch-dependent family's group of a call's items) the
embedding cache, else an identical unit already in flight (single flight), else a job for the
batcher's torch thread, where units of concurrent calls share forwards (batcher.py, cache.py); the
reply is built in a parse thread (tensors -> proto). An item without tensors or media is a cache
reference.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from services.common import chunks, metrics, shm, tracing
from services.common.admission import Admission
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig, torch_threads
from services.common.errors import InvalidArgument, NotFound
from services.common.media import MediaLimits
from services.common.tensors import from_named
from services.encoder.backends import open_backend
from services.encoder.batcher import Batcher, BatchLimits, Job
from services.encoder.cache import EmbeddingCache, Entry, Flight, Key, Signature, item_signature, signatures_agree
from services.encoder.media_inputs import MediaInputs
from services.encoder.towers import item_embeddings_proto
from services.models import evs
from services.models.base import VIDEO, ItemEmbeddings
from services.models.checkpoint import Checkpoint, modality_from_proto
from services.models.inputs import evaluate


@dataclass(frozen=True)
class Unit:
    """Items the tower encodes as one: their request indexes, their tensors (None: a cache reference),
    their key (None: an item without mm_hash, encoded every time) and tower input rows."""

    modality: str
    indexes: list[int]
    inputs: list[dict[str, torch.Tensor] | None]
    key: Key | None
    num_patches: int
    signature: Signature  # what a cache entry under `key` must agree with (cache.py)
    # Per item: EVS's (frame groups, rate) for a video to prune after the tower, else None.
    prunes: tuple[tuple[int, float] | None, ...] = ()

    @property
    def is_reference(self) -> bool:
        return any(tensors is None for tensors in self.inputs)


@dataclass
class _Pending:
    """A unit this call waits for; `flight` when other calls may share it."""

    unit: Unit
    future: Future  # -> list[ItemEmbeddings]
    flight: Flight | None = None


def is_reference(item: encoder_pb2.MediaItem) -> bool:
    """A MediaItem with neither tensors nor media: the encoder answers it from its cache by mm_hash."""
    return not item.tensors and not item.HasField("media")


def _awaitable(future: Future) -> asyncio.Future:
    """An asyncio future of this loop that follows `future` (which other calls may share: unlike
    asyncio.wrap_future, cancelling it leaves `future` alone)."""
    loop = asyncio.get_running_loop()
    out = loop.create_future()

    def copy(done: Future) -> None:
        if out.done():
            return
        if done.cancelled():
            out.cancel()
        elif done.exception() is not None:
            out.set_exception(done.exception())
        else:
            out.set_result(done.result())

    def landed(done: Future) -> None:
        if not loop.is_closed():
            loop.call_soon_threadsafe(copy, done)

    future.add_done_callback(landed)
    return out


def _pruner(prunes: tuple[tuple[int, float] | None, ...]):
    """The job's finishing step when it has videos to prune (EVS after the tower; the cache keeps the
    pruned rows, under an mm_hash that holds the rate), else None."""
    if not any(prunes):
        return None

    def finish(out: list[ItemEmbeddings]) -> list[ItemEmbeddings]:
        return [emb if spec is None else evs.prune(emb, *spec) for emb, spec in zip(out, prunes, strict=True)]

    return finish


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """NaN or Inf in a router's pixel values or audio features would come back as NaN embeddings with
    an OK status (the LLM refuses them only later, and a router may cache them): refused here."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidArgument(f"{where}.tensors: {name} holds NaN or Inf; encoder inputs must be finite",
                                  reason="ENCODER_INPUT_NOT_FINITE", metadata={"input": name})


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, checkpoint: Checkpoint, cfg: EncoderConfig):
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.cfg = cfg
        # The process's share of the cores (the LLM's engine process has its own): not torch's all-cores default.
        torch.set_num_threads(torch_threads(cfg.torch_threads))
        # Parsing and replies (the bulk of a large request's bytes) run beside the torch thread.
        self._parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encoder-parse")
        self.backend = open_backend(checkpoint, cfg)  # torch loads the towers; Triton's models are checked
        self.model = self.backend.model  # None with Triton: the weights live there
        self.media_inputs = MediaInputs(self.family, checkpoint.path,
                                        MediaLimits(max_bytes=cfg.max_media_mib << 20, max_image_pixels=cfg.max_image_pixels))
        self.cache = EmbeddingCache(capacity_bytes=cfg.cache_mib << 20)
        # The one thread that owns torch: the batcher's (Triton: one per request in flight).
        self.batcher = Batcher(self.backend.run, BatchLimits(
            mode=cfg.batching, wait_s=cfg.batch_wait_ms / 1000, max_items=cfg.max_batch_items,
            max_patches=cfg.max_batch_patches), workers=self.backend.workers)
        self._shm = shm.Exporter(ttl_s=cfg.shm_ttl_s, max_bytes=cfg.shm_max_mib << 20)
        # The parse threads' and the batcher's queues have no bound of their own: this bounds them.
        self.admission = Admission(cfg.max_concurrent_encodes, service="encoder", flag="--max-concurrent-encodes",
                                   reason="ENCODER_OVERLOADED")

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        with self.admission.admit():  # StreamEncode comes through here too
            return await self._encode(request)

    async def _encode(self, request: encoder_pb2.EncodeRequest) -> encoder_pb2.EncodeResponse:
        loop = asyncio.get_running_loop()
        with tracing.span("encoder.inputs", items=len(request.items)):  # media mode: decode + HF processor
            units = await loop.run_in_executor(self._parse_pool, self._parse, request)
        results: list[ItemEmbeddings | None] = [None] * len(request.items)
        hits = [False] * len(request.items)
        pending = self._plan(units, results, hits)
        waits = [_awaitable(p.future) for p in pending]
        try:
            with tracing.span("encoder.tower", units=len(pending)):  # queue + forward; cache hits skip it
                done = await asyncio.gather(*waits)
        except BaseException:  # cancelled, past its deadline, or a unit failed: the rest need not run
            for wait in waits:
                wait.cancel()
            self._abandon(pending)
            raise
        for p, out in zip(pending, done):
            for i, emb in zip(p.unit.indexes, out):
                results[i] = emb
        response = await loop.run_in_executor(self._parse_pool, self._reply, request, results, hits)
        metrics.count_sent(metrics.ENCODER_REPLY, metrics.tensor_bytes(t for _, t in chunks.item_tensors(response.items)))
        if request.embeddings_transport == encoder_pb2.EMBEDDINGS_TRANSPORT_SHARED_MEMORY and self._shm.enabled:
            tensors = [t for _, t in chunks.item_tensors(response.items)]
            await loop.run_in_executor(self._parse_pool, self._shm.export, tensors)  # inline when full
        return response

    async def StreamEncode(self, request: encoder_pb2.StreamEncodeRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[encoder_pb2.StreamEncodeResponse]:
        response = await self.Encode(request.request, context)
        own = chunks.chunk_budget(self.cfg.server.max_message_mib << 20)
        budget = min(request.max_chunk_bytes, own) if request.max_chunk_bytes > 0 else own
        messages = await asyncio.get_running_loop().run_in_executor(
            self._parse_pool, chunks.split_encode_response, response, max(budget, chunks.MIN_CHUNK_BYTES))
        for message in messages:
            yield message

    def close(self) -> None:
        """Ends the torch thread (after the jobs still queued) and frees the shared-memory regions still
        waiting for their reader. Joined, not left as a daemon: a thread inside torch at interpreter
        exit aborts the process."""
        self.batcher.close()
        self.backend.close()
        self._shm.close()

    async def GetModelInfo(self, request, context) -> encoder_pb2.GetModelInfoResponse:
        return encoder_pb2.GetModelInfoResponse(model_info=self.checkpoint.model_info(), backend=self.backend.proto)

    async def GetStats(self, request, context) -> encoder_pb2.GetStatsResponse:
        cache, cached, forwards = self.cache, self.cache.counters, self.batcher.counters
        return encoder_pb2.GetStatsResponse(
            cache=encoder_pb2.EmbeddingCacheStats(
                hits=cached.hits, misses=cached.misses, evictions=cached.evictions, used_bytes=cache.used_bytes,
                capacity_bytes=cache.capacity_bytes, entries=cache.num_entries,
                single_flight_joins=cached.single_flight_joins, reference_misses=cached.reference_misses),
            batching=encoder_pb2.BatchingStats(
                forwards=forwards.forwards, items=forwards.items, max_items_per_forward=forwards.max_items_per_forward,
                forwards_by_items_log2=forwards.forwards_by_items_log2,
                queue_wait_mean_ms=forwards.queue_wait_total_s * 1000 / max(1, forwards.waited_items),
                queue_wait_max_ms=forwards.queue_wait_max_s * 1000, cancelled_items=forwards.cancelled_items,
                mode=self.batcher.limits.mode))

    def _parse(self, request: encoder_pb2.EncodeRequest) -> list[Unit]:
        """Tensors of every item, each checked against the schema and the per-item budget (no torch)."""
        self.checkpoint.check_fingerprint(request.model_fingerprint)
        if len(request.items) > self.cfg.max_items_per_request:
            raise InvalidArgument(
                f"{len(request.items)} items in one request; at most {self.cfg.max_items_per_request}",
                reason="TOO_MANY_ITEMS", metadata={"maxItemsPerRequest": str(self.cfg.max_items_per_request)})
        by_modality: dict[str, list[int]] = {}
        inputs: list[dict[str, torch.Tensor] | None] = []
        patches: list[int] = []
        signatures: list = []
        prunes: list[tuple[int, float] | None] = []
        for index, item in enumerate(request.items):
            where = f"items[{index}]"
            modality = modality_from_proto(item.modality)
            if modality not in self.family.modalities:
                raise InvalidArgument(f"{where}: this model does not take {modality}", reason="MODALITY_UNSUPPORTED")
            by_modality.setdefault(modality, []).append(index)
            rate = self._pruning_rate(item, modality, where)
            if is_reference(item):
                if not item.mm_hash:
                    raise InvalidArgument(f"{where}: no tensors and no mm_hash; send the item's tensors, or the "
                                          "mm_hash of an item this encoder encoded", reason="ENCODER_INPUT_INVALID")
                if not self.cache.capacity_bytes:  # nothing is ever held: tell the caller, not NOT_FOUND each time
                    raise InvalidArgument(f"{where}: no tensors or media, and this encoder keeps no embedding cache "
                                          "(--cache-mib 0): send the item's tensors or media",
                                          reason="ENCODER_INPUT_INVALID")
                inputs.append(None)
                patches.append(0)
                signatures.append(None)
                prunes.append(None)  # a cached pruned item was cached pruned (its mm_hash holds the rate)
                continue
            tensors = (self.media_inputs.encoder_inputs(item, modality, where) if item.HasField("media")
                       else from_named(item.tensors))
            bindings = self.family.check_encoder_item(modality, tensors, where=f"{where}.tensors",
                                                      max_patches=self.cfg.max_item_patches)
            _check_finite(tensors, where)
            expression = self.family.encoder_schema(modality).patches
            inputs.append(tensors)
            patches.append(evaluate(expression, bindings) if expression else 1)
            prune = self._prune_spec(item, tensors, rate, where) if rate else None
            prunes.append(prune)
            # A pruned item's rows are its retained count: the same media at another count is another entry.
            rows = item.video_pruning.retained_tokens if prune else bindings.get("tokens")
            signatures.append(item_signature(tensors, rows))
        hashes = [item.mm_hash for item in request.items]
        if self.family.encoder_batching != "alone":
            return [Unit(modality, [i], [inputs[i]], (modality, (hashes[i],)) if hashes[i] else None, patches[i],
                         (signatures[i],), (prunes[i],))
                    for modality, indexes in by_modality.items() for i in indexes]
        # The family's embeddings depend on the call's other items: its items of a modality are one unit,
        # cached under all their hashes together.
        return [Unit(modality, indexes, [inputs[i] for i in indexes],
                     (modality, tuple(hashes[i] for i in indexes)) if all(hashes[i] for i in indexes) else None,
                     sum(patches[i] for i in indexes), tuple(signatures[i] for i in indexes),
                     tuple(prunes[i] for i in indexes))
                for modality, indexes in by_modality.items()]

    def _pruning_rate(self, item: encoder_pb2.MediaItem, modality: str, where: str) -> float:
        """The item's EVS rate (0: none), checked: in [0, 1), and above 0 only for a video of a family with EVS."""
        if not item.HasField("video_pruning"):
            return 0.0
        rate = evs.check_rate(item.video_pruning.rate, f"{where}.video_pruning.rate")
        if rate and (modality != VIDEO or not self.family.supports_video_pruning):
            what = f"{self.family.name} model" if modality == VIDEO else f"{modality} item"
            raise InvalidArgument(f"{where}: video pruning (EVS) at rate {rate} for a {what}, which has none; "
                                  "send rate 0", reason="VIDEO_PRUNING_UNSUPPORTED",
                                  metadata={"family": self.family.name})
        return rate

    def _prune_spec(self, item: encoder_pb2.MediaItem, tensors: dict[str, torch.Tensor], rate: float,
                    where: str) -> tuple[int, float]:
        """(frame groups, rate) of a video to prune, once its retained count agrees with the caller's."""
        frames, per_frame = self.family.video_token_grid(tensors)
        retained = evs.retained_count(per_frame, frames, rate)
        if item.video_pruning.retained_tokens != retained:
            raise InvalidArgument(
                f"{where}.video_pruning: retained_tokens is {item.video_pruning.retained_tokens}; EVS keeps {retained} "
                f"of {frames} frames x {per_frame} tokens at rate {rate}", reason="VIDEO_RETAINED_COUNT_MISMATCH",
                metadata={"retainedTokens": str(retained)})
        return frames, rate

    def _plan(self, units: list[Unit], results: list[ItemEmbeddings | None], hits: list[bool]) -> list[_Pending]:
        """Serves units from the cache, joins those in flight (also an identical unit earlier in this call)
        and queues the rest. Runs on the event loop, so looking a key up and starting its flight are one
        step. A cache reference the encoder does not hold fails the call (NOT_FOUND); the encodings it
        started go on, so that the caller's retry with the tensors finds them."""
        pending: list[_Pending] = []
        missing: list[str] = []
        counters = self.cache.counters
        try:
            for unit in units:
                hit = self._find(unit)
                if isinstance(hit, Flight):
                    counters.single_flight_joins += len(unit.indexes)
                    pending.append(_Pending(unit, hit.future, hit))
                elif isinstance(hit, Entry):
                    counters.hits += len(unit.indexes)
                    for i, emb in zip(unit.indexes, hit.embeddings):
                        results[i], hits[i] = emb, True
                elif unit.is_reference:
                    missing.extend(h for h, tensors in zip(unit.key[1], unit.inputs) if tensors is None)
                else:
                    counters.misses += len(unit.indexes)
                    job = Job(unit.modality, list(unit.inputs), unit.num_patches,  # type: ignore[arg-type]
                              batchable=self.family.encoder_batching != "alone", finish=_pruner(unit.prunes))
                    flight = self.cache.start(unit.key, job.future, unit.signature) if unit.key else None
                    pending.append(_Pending(unit, self.batcher.submit(job), flight))
        except BaseException:
            self._abandon(pending)
            raise
        if missing:
            for p in pending:
                if p.flight is None:
                    self.batcher.withdraw(p.future)
                else:
                    self.cache.leave(p.flight)
            counters.reference_misses += len(missing)
            shown = ", ".join(missing[:4]) + (", ..." if len(missing) > 4 else "")
            raise NotFound(f"the encoder holds no embeddings for {len(missing)} referenced item(s) ({shown}); "
                           "send them again with their tensors", reason="EMBEDDING_NOT_CACHED",
                           metadata={"mmHashes": ",".join(missing)})
        return pending

    def _find(self, unit: Unit) -> Entry | Flight | None:
        """The unit's cache entry, else its flight (joined), else None. MM_HASH_CONFLICT when the tensors
        sent under its key differ in shape or dtype from those encoded under it."""
        if unit.key is None:
            return None
        found: Entry | Flight | None = self.cache.lookup(unit.key) or self.cache.join(unit.key)
        if found is not None and not signatures_agree(found.signature, unit.signature):
            if isinstance(found, Flight):
                self._abandon([_Pending(unit, found.future, found)])
            raise InvalidArgument(
                f"items[{unit.indexes[0]}]: mm_hash {','.join(unit.key[1])!r} was encoded from other tensors (names, "
                "dtypes or embedding rows); an mm_hash must identify the media and its processing arguments",
                reason="MM_HASH_CONFLICT", metadata={"mmHash": ",".join(unit.key[1])})
        return found

    def _abandon(self, pending: list[_Pending]) -> None:
        """The call ended early: it stops waiting, and what no other call waits for leaves the queue."""
        for p in pending:
            if p.future.done():
                continue
            if p.flight is None or self.cache.leave(p.flight):
                self.batcher.withdraw(p.future)

    def _reply(self, request: encoder_pb2.EncodeRequest, results: list[ItemEmbeddings | None],
               hits: list[bool]) -> encoder_pb2.EncodeResponse:
        """Tensors -> proto (a parse thread)."""
        items = [item_embeddings_proto(item.mm_hash, emb) for item, emb in zip(request.items, results)]
        for item, hit in zip(items, hits):
            item.cache_hit = hit
        return encoder_pb2.EncodeResponse(items=items)
