"""The encoder's embedding cache (real tiny Qwen2-VL tower, real images, a real port-0 server): hits,
LRU eviction by bytes, single flight across calls and within one, cache references, conflicts."""

from __future__ import annotations

import grpc
import pytest
import torch

from services.common.errors import error_info
from services.common.tensors import from_proto
from services.encoder.cache import EmbeddingCache, embeddings_bytes
from services.models.base import ItemEmbeddings
from tests.encoder.helpers import EncoderHarness, Gate, media_item, wait_until


@pytest.fixture
def harness(qwen2_vl_dir):
    h = EncoderHarness(qwen2_vl_dir)
    yield h
    h.close()


@pytest.fixture
def gate(harness, monkeypatch) -> Gate:
    gate = Gate(harness.family.encode)
    monkeypatch.setattr(harness.family, "encode", gate)
    return gate


def _rows(reply, index: int = 0) -> torch.Tensor:
    return from_proto(reply.items[index].embeddings)


def test_repeated_item_is_served_from_the_cache(harness, gate):
    tensors = harness.inputs(seed=1)
    first = harness.encode(media_item("img-1", tensors))
    again = harness.encode(media_item("img-1", tensors))
    assert gate.forwards == [1], "the second call ran the tower"
    assert not first.items[0].cache_hit and again.items[0].cache_hit
    assert torch.equal(_rows(first), _rows(again))
    assert torch.equal(_rows(again), harness.alone(tensors).embeddings)
    cache = harness.stats().cache
    assert (cache.hits, cache.misses, cache.entries) == (1, 1, 1)
    assert cache.used_bytes == _rows(first).numel() * 4 and cache.capacity_bytes == 1024 << 20


def test_cache_reference_hit_and_miss(harness, gate):
    tensors = harness.inputs(seed=2)
    encoded = harness.encode(media_item("img-2", tensors))
    served = harness.encode(media_item("img-2", None))  # no tensors: a reference
    assert served.items[0].cache_hit and served.items[0].mm_hash == "img-2"
    assert torch.equal(_rows(served), _rows(encoded))

    with pytest.raises(grpc.aio.AioRpcError) as caught:  # one known, two unknown: the whole call fails
        harness.encode(media_item("img-2", None), media_item("gone-a", None), media_item("gone-b", None))
    err = caught.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(err)
    assert info.reason == "EMBEDDING_NOT_CACHED" and dict(info.metadata) == {"mmHashes": "gone-a,gone-b"}
    assert gate.forwards == [1]
    assert harness.stats().cache.reference_misses == 2


def test_missing_reference_keeps_the_items_it_sent_for_the_retry(harness, gate):
    """A call with tensors for one item and an unknown reference fails NOT_FOUND, but the item it sent is
    still encoded, so the caller's retry (the processor re-sends the missing one) finds it."""
    a, b = harness.inputs(seed=3), harness.inputs(seed=4)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        harness.encode(media_item("a", a), media_item("b", None))
    assert error_info(caught.value).reason == "EMBEDDING_NOT_CACHED"
    wait_until(lambda: harness.stats().cache.entries == 1, what="item a cached")
    retry = harness.encode(media_item("a", None), media_item("b", b))
    assert [item.cache_hit for item in retry.items] == [True, False]
    assert gate.forwards == [1, 1]


def test_identical_items_in_one_call_are_encoded_once(harness, gate):
    tensors = harness.inputs(seed=5)
    reply = harness.encode(media_item("same", tensors), media_item("same", tensors), media_item("same", None))
    assert gate.forwards == [1]
    assert torch.equal(_rows(reply, 0), _rows(reply, 1)) and torch.equal(_rows(reply, 0), _rows(reply, 2))
    assert harness.stats().cache.single_flight_joins == 2


def test_concurrent_identical_calls_run_the_tower_once(harness, gate):
    """N calls for one mm_hash while its encoding is in the tower: one forward, N equal replies."""
    blocker = harness.inputs(seed=6)
    tensors = harness.inputs(seed=7)
    gate.open.clear()
    first = harness.start(media_item("blocker", blocker))
    assert gate.entered.wait(30)
    calls = [harness.start(media_item("hot", tensors)) for _ in range(6)]
    wait_until(lambda: harness.stats().cache.single_flight_joins == 5, what="5 joins")
    gate.open.set()
    first.result(60)
    replies = [call.result(60) for call in calls]
    assert gate.forwards == [1, 1]  # the blocker, then "hot" once
    for reply in replies:
        assert torch.equal(_rows(reply), harness.alone(tensors).embeddings)


def test_a_failed_flight_fails_every_waiter_the_same_way(harness, monkeypatch):
    def broken(model, modality, items):
        gate_entered.set()
        assert release.wait(30)
        raise RuntimeError("shape '[4, 2]' is invalid for input of size 7")

    import threading

    gate_entered, release = threading.Event(), threading.Event()
    monkeypatch.setattr(harness.family, "encode", broken)
    tensors = harness.inputs(seed=8)
    calls = [harness.start(media_item("doomed", tensors))]
    assert gate_entered.wait(30)
    calls += [harness.start(media_item("doomed", tensors)) for _ in range(2)]
    wait_until(lambda: harness.stats().cache.single_flight_joins == 2, what="2 joins")
    release.set()
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            call.result(60)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert error_info(caught.value).reason == "ENCODER_FAILED"
    assert harness.stats().cache.entries == 0  # a failure is not cached: the next call encodes again
    monkeypatch.undo()
    assert not harness.encode(media_item("doomed", tensors)).items[0].cache_hit


def test_reused_hash_with_other_shapes_is_refused(harness, gate):
    harness.encode(media_item("reused", harness.inputs(seed=9, width=112, height=112)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        harness.encode(media_item("reused", harness.inputs(seed=9, width=168, height=112)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert info.reason == "MM_HASH_CONFLICT" and dict(info.metadata) == {"mmHash": "reused"}


def test_lru_eviction_by_bytes(harness, gate):
    items = {name: harness.inputs(seed=10 + i) for i, name in enumerate("abc")}
    size = embeddings_bytes((harness.alone(items["a"]),))
    harness.servicer.cache = EmbeddingCache(capacity_bytes=2 * size + size // 2)  # room for two
    harness.encode(media_item("a", items["a"]))
    harness.encode(media_item("b", items["b"]))
    harness.encode(media_item("a", None))  # a is now the most recently used: b goes first
    harness.encode(media_item("c", items["c"]))
    cache = harness.stats().cache
    assert (cache.entries, cache.evictions, cache.used_bytes) == (2, 1, 2 * size)
    assert harness.encode(media_item("a", None), media_item("c", None)).items[1].cache_hit
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        harness.encode(media_item("b", None))
    assert dict(error_info(caught.value).metadata) == {"mmHashes": "b"}


def test_cancelled_call_leaves_the_queue(harness, gate):
    """A call past its deadline while its item waits behind a forward: the item never reaches the tower."""
    gate.open.clear()
    first = harness.start(media_item("busy", harness.inputs(seed=13)))
    assert gate.entered.wait(30)
    late = harness.start(media_item("late", harness.inputs(seed=14)), timeout_s=0.5)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        late.result(30)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: harness.stats().batching.cancelled_items == 1, what="the item withdrawn")
    gate.open.set()
    first.result(60)
    assert gate.forwards == [1]
    assert harness.stats().cache.entries == 1


def test_cache_off_still_encodes_identical_items_once(qwen2_vl_dir, monkeypatch):
    h = EncoderHarness(qwen2_vl_dir, cache_mib=0)
    try:
        gate = Gate(h.family.encode)
        monkeypatch.setattr(h.family, "encode", gate)
        tensors = h.inputs(seed=15)
        reply = h.encode(media_item("x", tensors), media_item("x", tensors))
        assert gate.forwards == [1] and not any(item.cache_hit for item in reply.items)
        assert not h.encode(media_item("x", tensors)).items[0].cache_hit and gate.forwards == [1, 1]
        assert (h.stats().cache.capacity_bytes, h.stats().cache.entries) == (0, 0)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # a reference can never be served: said at once
            h.encode(media_item("x", None))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "ENCODER_INPUT_INVALID" and "--cache-mib 0" in caught.value.details()
    finally:
        h.close()


def test_cache_unit():
    rows = lambda n: (ItemEmbeddings(torch.zeros(n, 4)),)
    cache = EmbeddingCache(capacity_bytes=100)
    cache.put(("image", ("a",)), rows(2), ())
    cache.put(("image", ("b",)), rows(3), ())
    assert cache.used_bytes == 80 and cache.num_entries == 2
    cache.put(("image", ("big",)), rows(7), ())  # over the whole budget: not stored, nothing evicted
    assert cache.num_entries == 2 and cache.counters.evictions == 0
    cache.put(("image", ("c",)), rows(2), ())  # evicts a (least recently used)
    assert cache.lookup(("image", ("a",))) is None and cache.lookup(("image", ("b",))) is not None
    assert cache.used_bytes == 80 and cache.counters.evictions == 1
