"""The processor's encoder replicas: health, balancing with affinity, failover, cache references.

Each `--encoder HOST:PORT` is one replica, or several when HOST is a name: every address it
resolves to (re-resolved periodically, as a Kubernetes headless service or `docker compose
--scale` publishes them). Each replica has its own channel and a grpc.health.v1 Watch stream; it
takes traffic only while SERVING and after its model and dtype were checked, and is ejected when
its health says otherwise, the watch breaks, or a call to it fails UNAVAILABLE.

A request's items are routed one by one: an item a replica is known to hold goes back to it as a
cache reference (mm_hash, no tensors); any other item goes where the consistent hash of its mm_hash
points; either way skipping replicas over the bounded load (ring.py), so a hot image spreads too.
Each replica's share is one concurrent Encode call; the reply comes back in request order. Items
whose replica fails UNAVAILABLE are retried once on the others, within the request's deadline;
other errors pass through as the encoder sent them.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import metrics
from services.common.api.triptych.common.v1 import model_info_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.config import ServerConfig
from services.common.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
                                    TriptychError, Unavailable)
from services.common.tls import ClientTLS
from services.processor.ring import HashRing
from services.processor.router import RECONNECT_OPTIONS, EncoderClient

log = logging.getLogger(__name__)
T = TypeVar("T")

ENCODER_SERVICE = encoder_pb2.DESCRIPTOR.services_by_name["EncoderService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
# The encoder's answer to a cache reference it does not hold (the shared contract; ErrorInfo
# metadata mmHashes lists the missing hashes joined by ",").
REFERENCE_MISS = "EMBEDDING_NOT_CACHED"
# Sent once at each admission: an encoder that answers NOT_FOUND EMBEDDING_NOT_CACHED takes cache
# references; one from before them (INVALID_ARGUMENT: no tensors) always gets the tensors.
PROBE_HASH = "triptych-pool-probe"
HELD_ENTRIES = 16384  # mm_hashes remembered with the replica that last returned them (LRU)
WATCH_RETRY_S = 1.0  # before watching again after the stream ended, or readmitting after a failed call
REFUSED_RETRY_S = 10.0  # before checking again a replica that serves another model or dtype
VERIFY_TIMEOUT_S = 10.0  # GetModelInfo and the reference probe at admission
RETIRE_WAIT_S = 60.0  # a replica gone from DNS finishes its calls within this before its channel closes

Resolver = Callable[[str, int], Awaitable[list[str]]]  # (host, port) -> IP addresses
ReplicaCheck = Callable[[str, model_info_pb2.ModelInfo], None]  # raises FailedPrecondition to refuse


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` has, in the resolver's order, each once."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Target:
    """One --encoder value: an IP address (one replica) or a name (a replica per address)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Target:
        host, _, port = text.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidArgument(f"--encoder {text!r} is not HOST:PORT (e.g. 127.0.0.1:50052, encoders.svc:50052, "
                                  "[::1]:50052)", reason="ENCODER_ADDRESS_INVALID")
        return cls(host, int(port))

    @property
    def is_name(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
            return False
        except ValueError:
            return True

    def __str__(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class ReplicaStats:
    """One replica as the pool sees it now (for logs, and metrics later)."""

    address: str
    healthy: bool
    state: str  # "healthy", or why it takes no traffic
    outstanding_items: int  # items in its Encode calls in flight
    calls: int  # Encode calls sent
    items: int  # items in them
    failures: int  # calls that failed (any error but a cache-reference miss)
    ejections: int
    takes_references: bool  # answers cache references (checked at admission)
    references: int  # items sent as cache references
    reference_misses: int  # of those, the ones it no longer held


class Replica:
    """One encoder address: its channel, health, load and counters."""

    def __init__(self, address: str, fingerprint: str, max_message_bytes: int, tls: ClientTLS | None = None,
                 server_name: str | None = None):
        self.address = address
        self.client = EncoderClient(address, fingerprint, RECONNECT_OPTIONS, max_message_bytes, tls, server_name)
        self.health = health_pb2_grpc.HealthStub(self.client.channel)
        self.healthy = False
        self.state = "connecting"
        self.refusal: FailedPrecondition | None = None  # set while it serves another model or dtype
        self.takes_references = False
        self.generation = 0  # bumped at each ejection: what it held before may be gone (a restart)
        self.outstanding = 0
        self.calls = self.items = self.failures = self.ejections = self.references = self.reference_misses = 0
        self.watch: asyncio.Task | None = None

    def stats(self) -> ReplicaStats:
        return ReplicaStats(self.address, self.healthy, self.state, self.outstanding, self.calls, self.items,
                            self.failures, self.ejections, self.takes_references, self.references,
                            self.reference_misses)


class HeldIndex:
    """mm_hash -> (address, generation) of the replica that last returned its embedding; a bounded LRU."""

    def __init__(self, capacity: int = HELD_ENTRIES):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[str, int]] = OrderedDict()

    def get(self, mm_hash: str) -> tuple[str, int] | None:
        entry = self._entries.get(mm_hash)
        if entry is not None:
            self._entries.move_to_end(mm_hash)
        return entry

    def note(self, mm_hash: str, address: str, generation: int) -> None:
        self._entries[mm_hash] = (address, generation)
        self._entries.move_to_end(mm_hash)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def forget(self, mm_hash: str) -> None:
        self._entries.pop(mm_hash, None)


def _header(request: encoder_pb2.EncodeRequest) -> encoder_pb2.EncodeRequest:
    """A request's fields other than its items, which every per-replica request keeps."""
    return encoder_pb2.EncodeRequest(model_fingerprint=request.model_fingerprint,
                                     embeddings_transport=request.embeddings_transport)


def item_bytes(items: Iterable[encoder_pb2.MediaItem]) -> int:
    """What the items carry: their tensors' bytes, or their media files' (tensor_bytes_sent metric)."""
    return sum(len(item.media.data) if item.HasField("media") else metrics.tensor_bytes(t.tensor for t in item.tensors)
               for item in items)


def reference(item: encoder_pb2.MediaItem) -> encoder_pb2.MediaItem:
    """The item as a cache reference: its identity without tensors or media."""
    return encoder_pb2.MediaItem(modality=item.modality, mm_hash=item.mm_hash)


async def first_error(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Runs the coroutines concurrently; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise task.exception()
    return [task.result() for task in tasks]


class EncoderPool:
    """The encoder replicas behind one processor; `encode` is what the servicer calls."""

    def __init__(self, targets: Sequence[str], fingerprint: str, *, resolve_interval_s: float = 30.0,
                 resolver: Resolver = resolve_host, max_message_bytes: int = ServerConfig.max_message_mib << 20,
                 tls: ClientTLS | None = None):
        if not targets:
            raise InvalidArgument("no encoder address; pass --encoder HOST:PORT (repeatable)",
                                  reason="ENCODER_ADDRESS_INVALID")
        self.targets = [Target.parse(t) for t in targets]
        self.fingerprint = fingerprint
        self.max_message_bytes = max_message_bytes  # the largest reply message taken; larger ones come in chunks
        self.resolve_interval_s = resolve_interval_s
        self.tls = tls
        self._resolver = resolver
        self._resolved: dict[Target, set[str]] = {}  # each target's addresses at its last good resolution
        self.replicas: dict[str, Replica] = {}
        self._ring = HashRing(())
        self._held = HeldIndex()
        self._check: ReplicaCheck = lambda address, info: None
        self._changed = asyncio.Event()  # any replica admitted, ejected or refused
        self._background: set[asyncio.Task] = set()
        self._retiring: set[Replica] = set()  # gone from DNS, finishing their calls

    # ---- start, membership, stop ----------------------------------------------------------
    async def connect(self, timeout_s: float, check: ReplicaCheck | None = None) -> None:
        """Resolves the targets, starts watching every replica and returns once one is healthy.

        `check` runs on each replica's ModelInfo at every admission (the dtype against the LLM's);
        a replica it or the fingerprint check refuses is never admitted, and refusing one during
        start-up fails start-up with that error.
        """
        self._check = check or self._check
        await self._refresh()
        if not self.replicas:
            raise Unavailable(f"no encoder address: {', '.join(map(str, self.targets))} resolved to none",
                              reason="ENCODER_UNAVAILABLE")
        if any(t.is_name for t in self.targets) and self.resolve_interval_s > 0:
            self._spawn(self._resolve_periodically())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            refused = [r.refusal for r in self.replicas.values() if r.refusal is not None]
            if refused:
                raise refused[0]
            if any(r.healthy for r in self.replicas.values()):
                return
            if loop.time() >= deadline:
                raise Unavailable(f"no encoder became healthy within {timeout_s:.0f} s: {self.describe()}",
                                  reason="ENCODER_UNAVAILABLE")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            except TimeoutError:
                pass

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.gather(*(r.client.close() for r in [*self.replicas.values(), *self._retiring]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """A background task outside any request's context (its log lines carry no request id)."""
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _refresh(self) -> None:
        """Resolves the names again; adds replicas for new addresses, retires those gone.

        A name that fails to resolve keeps its previous addresses: a DNS hiccup ejects nothing.
        """
        for target in self.targets:
            if not target.is_name:
                self._resolved[target] = {str(target)}
                continue
            try:
                hosts = await self._resolver(target.host, target.port)
            except OSError as err:
                log.warning("encoder %s: cannot resolve %s (%s); keeping %s", target, target.host, err,
                            sorted(self._resolved.get(target, ())) or "none")
                continue
            if hosts:
                self._resolved[target] = {format_address(h, target.port) for h in hosts}
        wanted = set().union(*self._resolved.values())
        added, gone = wanted - self.replicas.keys(), self.replicas.keys() - wanted
        # TLS checks a replica's certificate for the name it was resolved from, not its IP address.
        names = {address: t.host for t, addresses in self._resolved.items() if t.is_name for address in addresses}
        for address in sorted(added):
            replica = self.replicas[address] = Replica(address, self.fingerprint, self.max_message_bytes, self.tls,
                                                       names.get(address))
            replica.watch = self._spawn(self._watch(replica))
        for address in sorted(gone):
            self._spawn(self._retire(self.replicas.pop(address)))
        if added or gone:
            self._ring = HashRing(self.replicas)
            log.info("encoder pool: %s", self.describe())

    async def _resolve_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval_s)
            await self._refresh()

    async def _retire(self, replica: Replica) -> None:
        """A replica no longer resolved: no new calls (it left the ring); its calls in flight finish."""
        replica.healthy, replica.state = False, "removed (no longer resolved)"
        if replica.watch:
            replica.watch.cancel()
        self._retiring.add(replica)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RETIRE_WAIT_S
        while replica.outstanding and loop.time() < deadline:
            await asyncio.sleep(0.5)
        self._retiring.discard(replica)
        await replica.client.close()

    # ---- health: admission and ejection ------------------------------------------------------
    async def _watch(self, replica: Replica, delay_s: float = 0.0) -> None:
        """Follows the replica's health while it is in the pool: admits it on SERVING (after checking
        its model, dtype and cache references), ejects it on anything else or a broken stream."""
        while True:
            await asyncio.sleep(delay_s)
            delay_s = WATCH_RETRY_S
            call = replica.health.Watch(health_pb2.HealthCheckRequest(service=ENCODER_SERVICE), wait_for_ready=True)
            try:
                verified = False  # checked once per stream: a broken stream may mean a restart with another model
                async for reply in call:
                    if reply.status != SERVING:
                        # Not SERVING (a SIGTERM): leave, so our open stream does not hold its graceful stop.
                        self._eject(replica, f"health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
                        break
                    if not verified:
                        await self._verify(replica)
                        verified = True
                    self._admit(replica)
                else:
                    self._eject(replica, "health watch ended")
            except grpc.aio.AioRpcError as err:
                self._eject(replica, f"health watch failed: {err.code().name}")
            except FailedPrecondition as err:  # another model or dtype: refused until that changes
                replica.refusal = err
                self._eject(replica, f"refused: {err.message}")
                self._changed.set()
                log.error("encoder %s refused: [%s] %s", replica.address, err.reason, err.message)
                delay_s = REFUSED_RETRY_S
            except TriptychError as err:  # it stopped answering while being checked
                self._eject(replica, f"check failed: {err.message}")
            finally:
                call.cancel()

    async def _verify(self, replica: Replica) -> None:
        info = await replica.client.connect(VERIFY_TIMEOUT_S)  # FailedPrecondition: another model
        self._check(replica.address, info)  # FailedPrecondition: another dtype than the LLM's
        replica.takes_references = await self._probe_references(replica, info)
        replica.refusal = None

    async def _probe_references(self, replica: Replica, info: model_info_pb2.ModelInfo) -> bool:
        modality = info.modalities[0] if info.modalities else tensor_pb2.MODALITY_IMAGE
        probe = encoder_pb2.EncodeRequest(model_fingerprint=self.fingerprint,
                                          items=[encoder_pb2.MediaItem(modality=modality, mm_hash=PROBE_HASH)])
        try:
            await replica.client.encode(probe, VERIFY_TIMEOUT_S)
            return True
        except NotFound as err:
            return err.reason == REFERENCE_MISS
        except (Unavailable, DeadlineExceeded):
            raise
        except TriptychError:
            return False  # an encoder without cache references: it always gets tensors

    def _admit(self, replica: Replica) -> None:
        replica.state = "healthy"
        if not replica.healthy:
            replica.healthy = True
            self._changed.set()
            log.info("encoder %s admitted (cache references: %s); pool: %s", replica.address,
                     "yes" if replica.takes_references else "no", self.describe())

    def _eject(self, replica: Replica, why: str) -> bool:
        """Takes the replica out of routing; True if it was in."""
        replica.state = why
        if not replica.healthy:
            return False
        replica.healthy = False
        replica.generation += 1
        replica.ejections += 1
        self._changed.set()
        log.warning("encoder %s ejected: %s; pool: %s", replica.address, why, self.describe())
        return True

    # ---- observation --------------------------------------------------------------------------
    def stats(self) -> list[ReplicaStats]:
        """Every replica's state and counters, by address (what metrics will export)."""
        return [self.replicas[a].stats() for a in sorted(self.replicas)]

    def describe(self) -> str:
        return "; ".join(f"{s.address} {s.state} (in flight {s.outstanding_items}, calls {s.calls}, "
                         f"failures {s.failures})" for s in self.stats()) or "no replicas"

    # ---- encoding -----------------------------------------------------------------------------
    async def encode(self, request: encoder_pb2.EncodeRequest, timeout_s: float) -> encoder_pb2.EncodeResponse:
        """The request's items spread over the healthy replicas; one ItemEmbeddings per item, in order."""
        if timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before encoding", reason="DEADLINE_EXCEEDED")
        deadline = asyncio.get_running_loop().time() + timeout_s
        keys: list[str] = []
        items: dict[str, encoder_pb2.MediaItem] = {}
        for index, item in enumerate(request.items):
            key = item.mm_hash or f"\0{index}"  # an item without a hash is its own key
            keys.append(key)
            items.setdefault(key, item)  # the same hash twice is encoded once
        if not items:
            return encoder_pb2.EncodeResponse()
        results = await self._encode_items(_header(request), items, deadline, frozenset(), retries_left=1)
        return encoder_pb2.EncodeResponse(items=[results[k] for k in keys])

    async def _encode_items(self, header: encoder_pb2.EncodeRequest, items: dict[str, encoder_pb2.MediaItem], deadline: float,
                            excluded: frozenset[str], retries_left: int) -> dict[str, encoder_pb2.ItemEmbeddings]:
        groups = self._route(list(items), excluded)
        parts = await first_error(
            self._encode_on(replica, header, {k: items[k] for k in keys}, deadline, excluded, retries_left)
            for replica, keys in groups.items())
        return {key: emb for part in parts for key, emb in part.items()}

    def _route(self, keys: list[str], excluded: frozenset[str]) -> dict[Replica, list[str]]:
        """Each key to the replica known to hold it, else to its place on the ring within the bounded load."""
        candidates = {a: r for a, r in self.replicas.items() if r.healthy and a not in excluded}
        if not candidates:
            failed = f" ({len(excluded)} failed this request)" if excluded else ""
            raise Unavailable(f"no encoder replica is available{failed}: {self.describe()}",
                              reason="ENCODER_UNAVAILABLE", retry_delay_s=WATCH_RETRY_S)
        loads = {a: r.outstanding for a, r in candidates.items()}
        groups: dict[str, list[str]] = {}
        for key in keys:
            held = self._held.get(key)
            holder = held[0] if held and held[0] in candidates and self._holds(candidates[held[0]], key) else None
            # The holder answers from its cache, unless it is over the bound: then the ring's next encodes it.
            address = self._ring.pick(key, loads, prefer=holder)
            loads[address] += 1
            groups.setdefault(address, []).append(key)
        return {candidates[a]: group for a, group in groups.items()}

    def _holds(self, replica: Replica, key: str) -> bool:
        return replica.takes_references and self._held.get(key) == (replica.address, replica.generation)

    async def _encode_on(self, replica: Replica, header: encoder_pb2.EncodeRequest, items: dict[str, encoder_pb2.MediaItem],
                         deadline: float, excluded: frozenset[str],
                         retries_left: int) -> dict[str, encoder_pb2.ItemEmbeddings]:
        try:
            return await self._call(replica, header, items, deadline)
        except Unavailable as err:
            if self._eject(replica, f"Encode failed: {err.message}") and self.replicas.get(replica.address) is replica:
                replica.watch.cancel()  # its health may still say SERVING: watch afresh before readmitting
                replica.watch = self._spawn(self._watch(replica, delay_s=WATCH_RETRY_S))
            if retries_left <= 0:
                raise
            log.warning("encoder %s failed (%s); retrying %d items on another replica", replica.address,
                        err.message, len(items))
            return await self._encode_items(header, items, deadline, excluded | {replica.address},
                                            retries_left - 1)

    async def _call(self, replica: Replica, header: encoder_pb2.EncodeRequest, items: dict[str, encoder_pb2.MediaItem],
                    deadline: float) -> dict[str, encoder_pb2.ItemEmbeddings]:
        """One Encode call (two or three when cached references went missing) to one replica."""
        loop = asyncio.get_running_loop()
        keys = list(items)
        references = {k for k in keys if self._holds(replica, k)}
        resent = False
        replica.outstanding += len(keys)
        replica.calls += 1
        replica.items += len(keys)
        try:
            while True:
                replica.references += len(references)
                request = encoder_pb2.EncodeRequest(
                    model_fingerprint=header.model_fingerprint, embeddings_transport=header.embeddings_transport,
                    items=[reference(items[k]) if k in references else items[k] for k in keys])
                metrics.count_sent(metrics.ENCODER_REQUEST, item_bytes(items[k] for k in keys if k not in references))
                try:
                    reply = await replica.client.encode(request, deadline - loop.time())
                    break
                except NotFound as err:
                    if err.reason != REFERENCE_MISS or not references:
                        raise
                    missing = set(err.metadata.get("mmHashes", "").split(",")) & references
                    replica.reference_misses += len(missing or references)
                    for key in missing or references:
                        self._held.forget(key)
                    # The missing ones with their tensors; if others were evicted meanwhile, all of them.
                    references = references - missing if missing and not resent else set()
                    resent = True
        except TriptychError:
            replica.failures += 1
            raise
        finally:
            replica.outstanding -= len(keys)
        answered = [e.mm_hash for e in reply.items]
        if answered != [items[k].mm_hash for k in keys]:
            raise Internal(f"the encoder at {replica.address} answered for other items than asked",
                           reason="ENCODER_REPLY_MISMATCH")
        if replica.takes_references:
            for key in keys:
                if items[key].mm_hash:
                    self._held.note(key, replica.address, replica.generation)
        return dict(zip(keys, reply.items, strict=True))
