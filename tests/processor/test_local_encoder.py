"""The processor's local encoder (--local-encode-max-patches): small items are encoded in the processor
(no Encode call reaches the encoder service), larger ones by the service, tokens exact either way;
the local tower runs on its own thread with one torch thread."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
import torch

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.inproc import CountingEncoder, InProcessServices
from tests.media import image_bytes
from tests.reference import hf_generate

MAX_NEW_TOKENS = 10
MAX_PATCHES = 128
SMALL = image_bytes(160, 120, seed=1)  # tiny Qwen2-VL: 96 patches (Qwen3-VL: 80)
LARGE = image_bytes(700, 300, seed=3, kind="gradient")  # 240 patches for both


@pytest.fixture(scope="module")
def qwen3_boosted(tmp_path_factory) -> Path:
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x30", 30.0)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl-x30"])
def served(request):
    model_dir = request.getfixturevalue("qwen3_boosted") if request.param == "qwen3_vl-x30" else tiny_checkpoint(
        request.param)
    services = InProcessServices(model_dir, encoder_cls=CountingEncoder, local_encode_max_patches=MAX_PATCHES)
    yield model_dir, services
    services.stop()


def _generate(services, prompt: str, images: list[bytes]) -> list[int]:
    with grpc.insecure_channel(services.address) as channel:
        request = processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
        return list(processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion.token_ids)


@pytest.mark.parametrize(("images", "local", "remote"), [
    ([SMALL], 1, 0),
    ([LARGE], 0, 1),
    ([SMALL, LARGE], 1, 1),
    ([SMALL, SMALL], 1, 0),  # one mm_hash: encoded once
], ids=["small", "large", "small-and-large", "small-twice"])
def test_small_items_stay_in_the_processor(served, images, local, remote):
    model_dir, services = served
    local_encoder, encoder = services.processor.local_encoder, services.encoder
    before = (local_encoder.num_items_encoded, encoder.num_items, encoder.num_calls)
    prompt = "Describe the images."
    assert _generate(services, prompt, images) == hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS)
    assert local_encoder.num_items_encoded - before[0] == local
    assert encoder.num_items - before[1] == remote
    assert encoder.num_calls - before[2] == (1 if remote else 0)  # no Encode call at all for small items


def test_patches_are_the_towers_input_rows(served):
    _, services = served
    local_encoder = services.processor.local_encoder
    request = processor_pb2.PreprocessRequest(messages=build_messages("x", [SMALL, LARGE]))
    with grpc.insecure_channel(services.address) as channel:
        pre = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(request, timeout=60)
    assert len(pre.encode_request.items) == 2  # Preprocess describes the split deployment, as before
    prepared = services._run(services.processor._prepare(request))
    patches = [local_encoder.patches(item) for item in prepared.processed.items]
    assert patches == [int(item.encoder_inputs["image_grid_thw"].prod()) for item in prepared.processed.items]
    assert patches[0] <= MAX_PATCHES < patches[1]
    assert local_encoder.select(prepared.unique_items) == {prepared.mm_hashes[0]}


def test_the_local_tower_runs_on_its_own_thread(served, monkeypatch):
    _, services = served
    family = services.processor.local_encoder.family
    threads: list[str] = []
    encode = family.encode

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return encode(*args, **kwargs)

    monkeypatch.setattr(family, "encode", recording)
    _generate(services, "x", [image_bytes(128, 96, seed=11)])
    assert threads and all(name.startswith("local-encoder") for name in threads), threads
    assert torch.get_num_threads() == 1  # the processor's torch stays on one thread
