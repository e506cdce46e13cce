"""The encoder service in process (port 0): every item checked before torch, failures sorted by fault.

A caller's bad input is INVALID_ARGUMENT naming the tensor and the dim, and never reaches the tower
(a spy in place of the family's encode proves it, and would also keep the test from allocating what
a claim asks for if the check were missing); out-of-memory is RESOURCE_EXHAUSTED, anything else of
ours INTERNAL. After each refusal the encoder still serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading

import grpc
import pytest
import torch
from PIL import Image

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig, ServerConfig
from services.common.errors import error_info
from services.common.tensors import from_proto, to_named
from services.encoder import towers as towers_module
from services.encoder.server import start_server
from services.encoder.servicer import EncoderServicer
from services.models.checkpoint import Checkpoint
from tests.media import image_bytes


@pytest.fixture(scope="module")
def servicer(qwen2_vl_dir):
    # No embedding cache: these tests send the same items again and again and need the tower to run.
    return EncoderServicer(Checkpoint(qwen2_vl_dir), EncoderConfig(model=qwen2_vl_dir, cache_mib=0))


@pytest.fixture(scope="module")
def item_tensors(servicer, qwen2_vl_dir) -> dict[str, torch.Tensor]:
    """One real image's encoder inputs, as the processor service makes them (64 patches, 16 tokens)."""
    family = servicer.family
    processor = family.load_processor(qwen2_vl_dir)
    image = Image.open(io.BytesIO(image_bytes(112, 112, seed=3))).convert("RGB")
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "image"}]}])
    (item,) = family.preprocess(processor, text, [image]).items
    return dict(item.encoder_inputs)


def _request(servicer, *items: dict[str, torch.Tensor]) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(model_fingerprint=servicer.checkpoint.fingerprint, items=[
        encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=f"h{i}", tensors=to_named(item))
        for i, item in enumerate(items)])


def _call(servicer, request: encoder_pb2.EncodeRequest, *more: encoder_pb2.EncodeRequest):
    """Encode each request on a fresh port-0 server; the last reply, or the first error."""
    async def body():
        server, _ = await start_server(servicer, ServerConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = encoder_pb2_grpc.EncoderServiceStub(channel)
                reply = None
                for r in (request, *more):
                    reply = await stub.Encode(r, timeout=60)
                return reply
        finally:
            await server.stop(0)

    return asyncio.run(body())


def _refusal(servicer, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        _call(servicer, request)
    return caught.value


def _tower_must_not_run(monkeypatch, servicer) -> None:
    def spy(*args, **kwargs):
        raise AssertionError("the tower ran on an item the schema should have refused")

    monkeypatch.setattr(servicer.family, "encode", spy)


def _still_serves(servicer, item_tensors) -> None:
    reply = _call(servicer, _request(servicer, item_tensors))
    assert list(from_proto(reply.items[0].embeddings).shape) == [16, servicer.family.hidden_size]


def test_claimed_grid_is_refused_before_the_tower(servicer, item_tensors, monkeypatch):
    """The defect: image_grid_thw [1, 10000, 10000] with 64 rows of pixels made the encoder allocate
    ~23 GB for 10^8 patches' positions and get OOM-killed. Now the shapes alone refuse it."""
    hostile = {**item_tensors, "image_grid_thw": torch.tensor([[1, 10000, 10000]])}
    with monkeypatch.context() as patch:
        _tower_must_not_run(patch, servicer)
        err = _refusal(servicer, _request(servicer, item_tensors, hostile))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "ENCODER_INPUT_INVALID"
    assert err.details() == ("items[1].tensors: pixel_values dim 0 is 64, expected 100000000 "
                             "(t*h*w with t=1, h=10000, w=10000)")
    _still_serves(servicer, item_tensors)


def test_item_over_the_patch_budget_is_refused(servicer, item_tensors, monkeypatch):
    with monkeypatch.context() as patch:
        _tower_must_not_run(patch, servicer)
        patch.setattr(servicer, "cfg", dataclasses.replace(servicer.cfg, max_item_patches=63))
        err = _refusal(servicer, _request(servicer, item_tensors))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(err)
    assert info.reason == "ITEM_TOO_LARGE" and dict(info.metadata) == {"maxItemPatches": "63"}
    assert "items[0].tensors: the item has 64 patches" in err.details()
    _still_serves(servicer, item_tensors)


@pytest.mark.parametrize("damage", ["missing-grid", "float-grid", "odd-grid", "extra-tensor", "patch-width"])
def test_malformed_items_name_the_tensor(servicer, item_tensors, monkeypatch, damage):
    item = dict(item_tensors)
    if damage == "missing-grid":
        del item["image_grid_thw"]
    elif damage == "float-grid":
        item["image_grid_thw"] = item["image_grid_thw"].float()
    elif damage == "odd-grid":
        item["image_grid_thw"] = torch.tensor([[1, 8, 8]]) + torch.tensor([[0, 1, -1]])  # 9 x 7: 63 patches
        item["pixel_values"] = item["pixel_values"][:63]
    elif damage == "extra-tensor":
        item["num_placeholder_tokens"] = torch.tensor([16])
    else:
        item["pixel_values"] = item["pixel_values"][:, :100]
    with monkeypatch.context() as patch:
        _tower_must_not_run(patch, servicer)
        err = _refusal(servicer, _request(servicer, item_tensors, item))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_info(err).reason == "ENCODER_INPUT_INVALID"
    assert err.details().startswith("items[1].tensors: ")
    assert ("image_grid_thw" if "grid" in damage else "pixel_values" if damage == "patch-width" else "unexpected") \
        in err.details()


@pytest.mark.parametrize(("failure", "code", "reason"), [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 22.35 GiB"), "RESOURCE_EXHAUSTED",
     "ENCODER_OUT_OF_MEMORY"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: out of memory"),
     "RESOURCE_EXHAUSTED", "ENCODER_OUT_OF_MEMORY"),
    (MemoryError(), "RESOURCE_EXHAUSTED", "ENCODER_OUT_OF_MEMORY"),
    (RuntimeError("shape '[4, 2]' is invalid for input of size 7"), "INTERNAL", "ENCODER_FAILED"),
    (ValueError("a bug of ours"), "INTERNAL", "ENCODER_FAILED"),
], ids=["torch-oom", "oom-runtime-error", "memory-error", "runtime-error", "value-error"])
def test_tower_failures_are_not_the_callers_fault(servicer, item_tensors, monkeypatch, failure, code, reason):
    """Inputs were checked before the tower: what fails in it is the machine's (OOM) or ours (INTERNAL)."""
    def encode(*args, **kwargs):
        raise failure

    with monkeypatch.context() as patch:
        patch.setattr(servicer.family, "encode", encode)
        err = _refusal(servicer, _request(servicer, item_tensors))
    assert err.code() == getattr(grpc.StatusCode, code) and error_info(err).reason == reason
    _still_serves(servicer, item_tensors)


def test_parsing_and_replies_run_off_the_event_loop(servicer, item_tensors, monkeypatch):
    """Proto -> tensors, schema checks and tensors -> proto in the parse threads, the tower in the torch thread."""
    threads: dict[str, set[str]] = {"check": set(), "to_proto": set(), "encode": set()}
    check, to_proto, encode = servicer.family.check_encoder_item, towers_module.to_proto, servicer.family.encode

    def recording_check(*args, **kwargs):
        threads["check"].add(threading.current_thread().name)
        return check(*args, **kwargs)

    def recording_to_proto(tensor):
        threads["to_proto"].add(threading.current_thread().name)
        return to_proto(tensor)

    def recording_encode(*args, **kwargs):
        threads["encode"].add(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(servicer.family, "check_encoder_item", recording_check)
    monkeypatch.setattr(servicer.family, "encode", recording_encode)
    monkeypatch.setattr(towers_module, "to_proto", recording_to_proto)
    _call(servicer, _request(servicer, item_tensors, item_tensors))
    assert threads["check"] and all(name.startswith("encoder-parse") for name in threads["check"]), threads
    assert threads["to_proto"] and all(name.startswith("encoder-parse") for name in threads["to_proto"]), threads
    assert threads["encode"] == {"encoder-torch"}, threads
