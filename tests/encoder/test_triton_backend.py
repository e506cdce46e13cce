"""The Triton backend against a real tritonserver on the CPU: families' tiny checkpoints exported with
`triptych export-triton` into one repository (one server start for the module), and the Triton backend's
embeddings compared bitwise with the torch backend's on the same items -- alone, two of different
sizes in one unit, video and audio items, bfloat16, and through system shared memory. Triton's dynamic batcher is seen
grouping concurrent requests of a family whose batch does not change its bytes."""

from __future__ import annotations

import io
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import tritonclient.http as httpclient
from PIL import Image

from services.cli import main as cli_main
from services.common.audio import AudioLimits, decode_audio
from services.common.config import EncoderConfig
from services.common.errors import FailedPrecondition
from services.common.video import VideoLimits, decode_video
from services.encoder.backends.torch_backend import TorchBackend
from services.encoder.backends.triton_backend import TritonBackend
from services.encoder.triton_export import ExportOptions, export
from services.models.checkpoint import Checkpoint
from services.tiny_checkpoints import TINY_FAMILIES
from tests.checkpoints import tiny_checkpoint
from tests.encoder.triton_server import TritonServer
from tests.media import audio_bytes, image_bytes, video_bytes

# One family per way a tower treats a batch (exact: llava, gemma3, internvl; tolerance: qwen2_vl, qwen3_vl with
# deepstack; alone: phi4mm): each Python-backend stub costs ~10 CPU-seconds to start on this 2-core machine.
# TRIPTYCH_TRITON_FAMILIES=all runs every family we have a tiny checkpoint of.
FAMILIES = (TINY_FAMILIES if os.environ.get("TRIPTYCH_TRITON_FAMILIES") == "all"
            else ("qwen2_vl", "qwen3_vl", "llava", "gemma3", "internvl", "phi4mm"))


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    repo = tmp_path_factory.mktemp("triton-repo")
    for family in FAMILIES:  # the command a user runs; models are <family>_image
        assert cli_main(["export-triton", "--model", str(tiny_checkpoint(family)), "--out", str(repo),
                         "--name", family, "--max-queue-delay-us", "20000"]) == 0
    assert cli_main(["export-triton", "--model", str(tiny_checkpoint("llava")), "--out", str(repo),
                     "--name", "llava_bf16", "--dtype", "bfloat16"]) == 0
    server = TritonServer(repo, repo.parent / "tritonserver.log").start(timeout_s=120 + 60 * len(FAMILIES))
    yield server
    server.stop()


def _items(checkpoint: Checkpoint, sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    processor = checkpoint.family.load_processor(checkpoint.path)
    images = [Image.open(io.BytesIO(image_bytes(w, h, seed=i))).convert("RGB") for i, (w, h) in enumerate(sizes)]
    return [checkpoint.family.image_encoder_inputs(processor, image) for image in images]


def _video_items(checkpoint: Checkpoint, seeds: list[int]) -> list[dict[str, torch.Tensor]]:
    """Real clips (made with av) through the family's frame choice and processor, one item each."""
    family = checkpoint.family
    processor = family.load_processor(checkpoint.path)
    limits = VideoLimits(max_frame_pixels=1 << 20, max_seconds=60, max_frames=16, max_total_pixels=1 << 24)
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "video"}]}])
    items = []
    for seed in seeds:
        video = decode_video(video_bytes(seed=seed, width=64 + 32 * seed, height=64), limits,
                             lambda metadata: family.video_frame_indices(processor, metadata, 2.0, 16), "v")
        (item,) = family.preprocess(processor, text, [], videos=[video]).items
        items.append(dict(item.encoder_inputs))
    return items


def _audio_items(checkpoint: Checkpoint, seconds: list[float]) -> list[dict[str, torch.Tensor]]:
    """Real clips (made with av), decoded at the feature extractor's rate, through the processor."""
    family = checkpoint.family
    processor = family.load_processor(checkpoint.path)
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "?"}]}])
    items = []
    for seed, length in enumerate(seconds):
        audio = decode_audio(audio_bytes(seconds=length, seed=seed), family.audio_sampling_rate(processor),
                             AudioLimits(max_seconds=60), "a")
        (item,) = family.preprocess(processor, text, [], audios=[audio]).items
        items.append(dict(item.encoder_inputs))
    return items


def _backend(checkpoint: Checkpoint, triton: TritonServer, name: str, **cfg) -> TritonBackend:
    return TritonBackend(checkpoint, EncoderConfig(model=checkpoint.path, backend="triton", triton_url=triton.url,
                                                   triton_model=name, **cfg))


def _assert_same_bytes(expected, got) -> None:
    assert len(expected) == len(got)
    for e, g in zip(expected, got):
        assert e.embeddings.dtype == g.embeddings.dtype == torch.float32
        assert torch.equal(e.embeddings, g.embeddings)
        assert len(e.deepstack) == len(g.deepstack)
        assert all(torch.equal(a, b) for a, b in zip(e.deepstack, g.deepstack))


@pytest.mark.parametrize("family", FAMILIES)
def test_same_embedding_bytes_as_torch(triton, family):
    checkpoint = Checkpoint(tiny_checkpoint(family))
    items = _items(checkpoint, [(160, 120), (96, 200)])
    local = TorchBackend(checkpoint, "cpu")
    remote = _backend(checkpoint, triton, family)
    try:
        _assert_same_bytes(local.run("image", items[:1]), remote.run("image", items[:1]))
        _assert_same_bytes(local.run("image", items), remote.run("image", items))  # one unit of two sizes
        if family == "qwen3_vl":
            assert len(remote.run("image", items[:1])[0].deepstack) == checkpoint.family.num_deepstack_layers >= 2
    finally:
        remote.close()


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in ("qwen2_vl", "qwen3_vl", "internvl")])
def test_video_embeddings_same_bytes_as_torch(triton, family):
    """A family's video tower is a Triton model of its own (<name>_video), typed from its video schema."""
    checkpoint = Checkpoint(tiny_checkpoint(family))
    assert "video" in checkpoint.family.modalities
    items = _video_items(checkpoint, [1, 2])
    local = TorchBackend(checkpoint, "cpu")
    remote = _backend(checkpoint, triton, family)
    try:
        _assert_same_bytes(local.run("video", items[:1]), remote.run("video", items[:1]))
        _assert_same_bytes(local.run("video", items), remote.run("video", items))
    finally:
        remote.close()


def test_audio_embeddings_same_bytes_as_torch(triton):
    """Phi-4-MM's audio tower (a batch-dependent family: a unit of two clips is one request)."""
    checkpoint = Checkpoint(tiny_checkpoint("phi4mm"))
    assert "audio" in checkpoint.family.modalities
    items = _audio_items(checkpoint, [1.0, 2.5])
    local = TorchBackend(checkpoint, "cpu")
    remote = _backend(checkpoint, triton, "phi4mm")
    try:
        _assert_same_bytes(local.run("audio", items[:1]), remote.run("audio", items[:1]))
        _assert_same_bytes(local.run("audio", items), remote.run("audio", items))
    finally:
        remote.close()


def test_bfloat16_embeddings_same_bytes(triton):
    """BF16 crosses KServe v2 as 2-byte words (numpy has no bf16 of its own): the bytes survive."""
    checkpoint = Checkpoint(tiny_checkpoint("llava"), torch.bfloat16)
    items = _items(checkpoint, [(160, 120), (96, 200)])
    expected = TorchBackend(checkpoint, "cpu").run("image", items)
    remote = TritonBackend(checkpoint, EncoderConfig(model=checkpoint.path, dtype="bfloat16", backend="triton",
                                                     triton_url=triton.url, triton_model="llava_bf16"))
    got = remote.run("image", items)
    assert [e.embeddings.dtype for e in got] == [torch.bfloat16] * 2
    assert all(torch.equal(e.embeddings, g.embeddings) for e, g in zip(expected, got))


def test_shared_memory_inputs_same_bytes(triton):
    checkpoint = Checkpoint(tiny_checkpoint("qwen2_vl"))
    items = _items(checkpoint, [(160, 120), (448, 448), (96, 200)])  # the second outgrows the first region
    local = TorchBackend(checkpoint, "cpu")
    remote = _backend(checkpoint, triton, "qwen2_vl", triton_transport="shm")
    try:
        for item in items:
            _assert_same_bytes(local.run("image", [item]), remote.run("image", [item]))
        regions = httpclient.InferenceServerClient(triton.url).get_system_shared_memory_status()
        assert len(regions) == 1  # the grown region replaced the first
    finally:
        remote.close()
    assert httpclient.InferenceServerClient(triton.url).get_system_shared_memory_status() == []


def test_dynamic_batching_groups_concurrent_requests(triton):
    """gemma3's tower is batch-exact: Triton hands its Python model several requests per execute."""
    checkpoint = Checkpoint(tiny_checkpoint("gemma3"))
    items = _items(checkpoint, [(64 + 8 * i, 64) for i in range(8)])
    expected = TorchBackend(checkpoint, "cpu").run("image", items)
    remote = _backend(checkpoint, triton, "gemma3")
    client = httpclient.InferenceServerClient(triton.url)
    before = client.get_inference_statistics("gemma3_image")["model_stats"][0]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda item: remote.run("image", [item])[0], items))
    _assert_same_bytes(expected, got)
    deadline = time.monotonic() + 30  # the Python backend reports statistics after it responds
    while (after := client.get_inference_statistics("gemma3_image")["model_stats"][0])["inference_count"] \
            < before["inference_count"] + 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert after["inference_count"] - before["inference_count"] == 8
    assert after["execution_count"] - before["execution_count"] < 8  # some requests shared an execute


def test_export_writes_typed_config(tmp_path):
    checkpoint = Checkpoint(tiny_checkpoint("qwen3_vl"))
    folders = export(checkpoint, tmp_path, ExportOptions(name="q", max_batch_size=4, instances=2))
    assert [f.name for f in folders] == [f"q_{modality}" for modality in checkpoint.family.modalities]
    folder = folders[0]
    config = (folder / "config.pbtxt").read_text()
    patch_dim = checkpoint.family.encoder_schema("image").tensors[0].dims[1]
    hidden, layers = checkpoint.family.hidden_size, checkpoint.family.num_deepstack_layers
    assert folder.name == "q_image"
    for line in (f'name: "pixel_values" data_type: TYPE_FP32 dims: [ -1, {patch_dim} ] allow_ragged_batch: true',
                 'name: "image_grid_thw" data_type: TYPE_INT64 dims: [ -1, 3 ] allow_ragged_batch: true',
                 f'name: "EMBEDDINGS" data_type: TYPE_FP32 dims: [ -1, {hidden} ]',
                 f'name: "DEEPSTACK" data_type: TYPE_FP32 dims: [ {layers}, -1, {hidden} ]',
                 "max_batch_size: 4", "dynamic_batching {", "instance_group [ { kind: KIND_CPU count: 2 } ]",
                 f'key: "fingerprint" value: {{ string_value: "{checkpoint.fingerprint}" }}'):
        assert line in config
    assert (folder / "1" / "model.py").is_file()
    assert (folder / "1" / "triptych" / "services" / "models" / "qwen3_vl.py").is_file()


def test_export_refuses_a_family_without_encoder_inputs(tmp_path, monkeypatch):
    checkpoint = Checkpoint(tiny_checkpoint("llava"))

    def no_schema(modality):
        raise NotImplementedError(f"no {modality} schema")

    monkeypatch.setattr(checkpoint.family, "encoder_schema", no_schema)
    with pytest.raises(FailedPrecondition) as caught:
        export(checkpoint, tmp_path, ExportOptions())
    assert caught.value.reason == "TRITON_EXPORT_UNSUPPORTED"
    assert "llava declares no encoder inputs for image" in caught.value.message
    assert not any(Path(tmp_path).iterdir())  # nothing half-written
