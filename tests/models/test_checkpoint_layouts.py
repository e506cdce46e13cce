"""Checkpoints as the hub ships them, not only as our factory writes them: sharded safetensors with an
index, and a generation_config whose defaults (repetition_penalty) transformers applies to greedy decoding."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
import torch
from transformers import AutoModelForImageTextToText, GenerationConfig

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.models.checkpoint import fingerprint
from tests.inproc import InProcessServices
from tests.media import image_bytes
from tests.reference import hf_generate


@pytest.fixture(scope="module")
def hub_layout_dir(qwen2_vl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub-layout")
    model = AutoModelForImageTextToText.from_pretrained(qwen2_vl_dir, dtype=torch.float32)
    model.generation_config.repetition_penalty = 2.0
    model.save_pretrained(out, max_shard_size="300KB")
    for path in qwen2_vl_dir.iterdir():  # tokenizer, processor, chat template
        if not (out / path.name).exists() and not path.name.startswith("model"):
            shutil.copy(path, out / path.name)
    return out


def test_layout_is_sharded_with_index(hub_layout_dir):
    index = json.loads((hub_layout_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert GenerationConfig.from_pretrained(hub_layout_dir).repetition_penalty == 2.0


def test_fingerprint_sees_weights_and_generation_config(qwen2_vl_dir, hub_layout_dir, tmp_path):
    assert fingerprint(hub_layout_dir) != fingerprint(qwen2_vl_dir)
    copy = tmp_path / "copy"
    shutil.copytree(hub_layout_dir, copy)
    assert fingerprint(copy) == fingerprint(hub_layout_dir)  # the folder's path is not part of it
    config = json.loads((copy / "generation_config.json").read_text())
    config["repetition_penalty"] = 1.0
    (copy / "generation_config.json").write_text(json.dumps(config))
    assert fingerprint(copy) != fingerprint(hub_layout_dir)


@pytest.mark.parametrize("images", [[], [image_bytes(120, 90, seed=41)]], ids=["text-only", "one-image"])
def test_sharded_checkpoint_matches_transformers(qwen2_vl_dir, hub_layout_dir, images):
    services = InProcessServices(hub_layout_dir)
    try:
        with grpc.insecure_channel(services.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            prompt = "Repeat after me: the cat, the cat, the cat."
            request = processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                    sampling=generation_pb2.SamplingParams(max_new_tokens=32))
            ours = list(stub.Generate(request, timeout=120).completion.token_ids)
    finally:
        services.stop()
    assert ours == hf_generate(hub_layout_dir, prompt, images, 32)  # transformers applies repetition_penalty too
    assert ours != hf_generate(qwen2_vl_dir, prompt, images, 32), "same weights without the penalty: no power"
