"""Cross-request batching in the encoder (real tiny towers, real port-0 servers): concurrent calls share a
forward, each item's embeddings as the family declares (bitwise or within its tolerance of alone); a
batch-dependent family never shares; the auto policy batches only where measured forwards pay."""

from __future__ import annotations

import grpc
import pytest
import torch

from services.common.errors import error_info
from services.common.tensors import from_proto
from services.encoder.batcher import BatchPolicy
from tests.checkpoints import tiny_checkpoint
from tests.encoder.helpers import EncoderHarness, Gate, media_item, wait_until


def _close(a: torch.Tensor, b: torch.Tensor, family) -> bool:
    if family.encoder_batching == "exact":
        return torch.equal(a, b)
    return a.shape == b.shape and float((a - b).abs().max()) <= family.encoder_batch_tolerance


@pytest.mark.parametrize("family_name", ["qwen2_vl", "llava"])
def test_concurrent_calls_share_one_forward(family_name, monkeypatch):
    """While the tower runs one call, four more queue; the next forward takes all four, and each reply
    is the item's embeddings alone (per the family's claim)."""
    h = EncoderHarness(tiny_checkpoint(family_name), batching="always")
    try:
        gate = Gate(h.family.encode)
        monkeypatch.setattr(h.family, "encode", gate)
        gate.open.clear()
        first = h.start(media_item("first", h.inputs(seed=0)))
        assert gate.entered.wait(30)
        sizes = [(112, 112), (168, 112), (112, 224), (140, 140)]  # variable-size items for Qwen
        inputs = [h.inputs(seed=i + 1, width=w, height=ht) for i, (w, ht) in enumerate(sizes)]
        calls = [h.start(media_item(f"item-{i}", tensors)) for i, tensors in enumerate(inputs)]
        wait_until(lambda: len(h.servicer.batcher._queue) == 4, what="4 queued jobs")
        gate.open.set()
        first.result(60)
        replies = [call.result(60) for call in calls]
        assert gate.forwards == [1, 4]
        rows = h.servicer.cache.lookup(("image", ("item-0",))).embeddings[0].embeddings
        assert rows.untyped_storage().nbytes() == rows.numel() * rows.element_size()  # not a view of the batch
        monkeypatch.undo()
        for tensors, reply in zip(inputs, replies):
            assert _close(from_proto(reply.items[0].embeddings), h.alone(tensors).embeddings, h.family)
        batching = h.stats().batching
        assert (batching.forwards, batching.items, batching.max_items_per_forward) == (2, 5, 4)
        assert list(batching.forwards_by_items_log2) == [1, 0, 1]  # one forward of 1 item, one of 4-7
        assert batching.mode == "always" and batching.queue_wait_max_ms > 0
    finally:
        h.close()


def test_batching_off_runs_one_item_per_forward(qwen2_vl_dir, monkeypatch):
    h = EncoderHarness(qwen2_vl_dir, batching="off")
    try:
        gate = Gate(h.family.encode)
        monkeypatch.setattr(h.family, "encode", gate)
        reply = h.encode(*(media_item(f"i{i}", h.inputs(seed=i)) for i in range(3)))
        assert gate.forwards == [1, 1, 1] and len(reply.items) == 3
    finally:
        h.close()


def test_batch_wait_gathers_calls_that_arrive_apart(qwen2_vl_dir, monkeypatch):
    """--batch-wait-ms: the first item waits for company (up to the wait), so calls sent a little apart
    share a forward even when the tower is idle."""
    h = EncoderHarness(qwen2_vl_dir, batching="always", batch_wait_ms=3000, max_batch_items=2)
    try:
        gate = Gate(h.family.encode)
        monkeypatch.setattr(h.family, "encode", gate)
        first = h.start(media_item("a", h.inputs(seed=1)))
        wait_until(lambda: len(h.servicer.batcher._queue) == 1, what="the first job queued")
        second = h.start(media_item("b", h.inputs(seed=2)))
        first.result(60), second.result(60)
        assert gate.forwards == [2]  # max_batch_items reached: it did not wait out the 3 s
    finally:
        h.close()


def test_batch_dependent_family_never_shares_a_forward(monkeypatch):
    """Phi-4-MM ("alone"): concurrent calls run one forward each, each call's items together as sent;
    the cache keys an item by its call's whole group, so the same image with other company is encoded
    again, and the same group is a hit."""
    h = EncoderHarness(tiny_checkpoint("phi4mm"), batching="always")
    try:
        gate = Gate(h.family.encode)
        monkeypatch.setattr(h.family, "encode", gate)
        a, b, c = (h.inputs(seed=i, width=w, height=ht) for i, (w, ht) in enumerate([(448, 448), (640, 320), (500, 300)]))
        gate.open.clear()
        first = h.start(media_item("a", a), media_item("b", b))
        assert gate.entered.wait(30)
        others = [h.start(media_item("a", a), media_item("c", c)), h.start(media_item("c", c))]
        wait_until(lambda: len(h.servicer.batcher._queue) == 2, what="2 queued jobs")
        gate.open.set()
        pair = first.result(60)
        [call.result(60) for call in others]
        # each call's group alone (the two queued calls in either order, as their parse threads finish)
        assert gate.forwards[0] == 2 and sorted(gate.forwards[1:]) == [1, 2]
        again = h.encode(media_item("a", a), media_item("b", b))
        assert [item.cache_hit for item in again.items] == [True, True] and len(gate.forwards) == 3
        assert torch.equal(from_proto(again.items[0].embeddings), from_proto(pair.items[0].embeddings))
        mixed = h.encode(media_item("a", a), media_item("b", None))  # one item sent, one a reference: same group
        assert [item.cache_hit for item in mixed.items] == [True, True]
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # another order is another group: not held
            h.encode(media_item("b", None), media_item("a", a))
        assert dict(error_info(caught.value).metadata) == {"mmHashes": "b"}
        assert len(gate.forwards) == 3
    finally:
        h.close()


def test_auto_policy_batches_only_where_it_pays():
    policy = BatchPolicy("auto")
    assert not policy.batch_pays("image")  # no forward alone measured yet: measure that first
    policy.record("image", num_jobs=1, num_patches=1000, seconds=1.0)  # the first forward: warm-up, not counted
    assert not policy.batch_pays("image")
    policy.record("image", num_jobs=1, num_patches=1000, seconds=0.130)
    assert policy.batch_pays("image")  # batched forwards, to measure them
    policy.record("image", num_jobs=8, num_patches=8000, seconds=8 * 0.5)  # warm-up again
    assert policy.batch_pays("image")
    policy.record("image", num_jobs=8, num_patches=8000, seconds=8 * 0.166)  # the bench Qwen tower on a CPU
    decisions = [policy.batch_pays("image") for _ in range(2 * BatchPolicy.PROBE_EVERY)]
    assert decisions.count(True) == 2  # only the probes
    for _ in range(20):  # batched forwards get cheaper (e.g. the load changed)
        policy.record("image", num_jobs=8, num_patches=8000, seconds=8 * 0.090)
    decisions = [policy.batch_pays("image") for _ in range(BatchPolicy.PROBE_EVERY)]
    assert decisions.count(False) == 1
    assert BatchPolicy("always").batch_pays("image") and not BatchPolicy("off").batch_pays("image")


def test_auto_mode_serves_concurrent_calls(qwen2_vl_dir):
    """--batching auto end to end: every reply equals the item alone whatever it decided."""
    h = EncoderHarness(qwen2_vl_dir, batching="auto")
    try:
        inputs = [h.inputs(seed=i) for i in range(6)]
        calls = [h.start(media_item(f"k{i}", tensors)) for i, tensors in enumerate(inputs)]
        for tensors, call in zip(inputs, calls):
            assert _close(from_proto(call.result(60).items[0].embeddings), h.alone(tensors).embeddings, h.family)
        batching = h.stats().batching
        assert batching.mode == "auto" and batching.items == 6
    finally:
        h.close()


def test_a_bad_item_fails_only_its_call_and_a_failed_forward_fails_its_calls(qwen2_vl_dir, monkeypatch):
    """Items are checked before they join a batch: a malformed one fails its own call while another call's
    item is served. A forward that fails (here an out-of-memory) fails every call with an item in it."""
    h = EncoderHarness(qwen2_vl_dir, batching="always", cache_mib=0)
    try:
        gate = Gate(h.family.encode)
        monkeypatch.setattr(h.family, "encode", gate)
        good = h.inputs(seed=1)
        bad = {**good, "image_grid_thw": torch.tensor([[1, 10000, 10000]])}
        gate.open.clear()
        first = h.start(media_item("first", h.inputs(seed=0)))
        assert gate.entered.wait(30)
        calls = [h.start(media_item("good", good)), h.start(media_item("bad", bad))]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            calls[1].result(60)
        assert error_info(caught.value).reason == "ENCODER_INPUT_INVALID"
        gate.open.set()
        first.result(60), calls[0].result(60)
        assert gate.forwards == [1, 1]

        def out_of_memory(model, modality, items):
            gate.forwards.append(len(items))
            assert gate.open.wait(60)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.35 GiB")

        gate.forwards.clear()
        gate.open.clear()
        monkeypatch.setattr(h.family, "encode", out_of_memory)
        blocked = h.start(media_item("x", h.inputs(seed=2)))
        wait_until(lambda: gate.forwards == [1], what="the first forward")
        batched = [h.start(media_item(f"y{i}", h.inputs(seed=3 + i))) for i in range(2)]
        wait_until(lambda: len(h.servicer.batcher._queue) == 2, what="2 queued jobs")
        gate.open.set()
        for call in (blocked, *batched):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                call.result(60)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(caught.value).reason == "ENCODER_OUT_OF_MEMORY"
        assert gate.forwards == [1, 2]
    finally:
        h.close()
