"""An encoder servicer on a real port-0 server in a background event loop, items from real images, and
a gate that holds the tower so tests can line calls up behind a forward."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import grpc
import torch
from PIL import Image

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.audio import AudioLimits, decode_audio
from services.common.config import EncoderConfig, ServerConfig
from services.common.tensors import to_named
from services.encoder.server import start_server
from services.encoder.servicer import EncoderServicer
from services.models.checkpoint import Checkpoint
from tests.media import audio_bytes, image_bytes

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


def item_inputs(family, processor, width: int, height: int, seed: int) -> dict[str, torch.Tensor]:
    """One real image's encoder inputs, as the processor service makes them."""
    image = Image.open(io.BytesIO(image_bytes(width, height, seed=seed))).convert("RGB")
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "image"}]}])
    (item,) = family.preprocess(processor, text, [image]).items
    return dict(item.encoder_inputs)


def audio_item_inputs(family, processor, seconds: float, seed: int) -> dict[str, torch.Tensor]:
    """One real clip's encoder inputs, as the processor service makes them (a 16-bit wav, decoded here)."""
    audio = decode_audio(audio_bytes(seconds=seconds, seed=seed), family.audio_sampling_rate(processor),
                         AudioLimits(max_seconds=60), "clip")
    text = family.render_chat(processor, [{"role": "user", "content": [{"type": "audio"}]}])
    (item,) = family.preprocess(processor, text, [], audios=[audio]).items
    return dict(item.encoder_inputs)


def media_item(mm_hash: str, tensors: dict[str, torch.Tensor] | None) -> encoder_pb2.MediaItem:
    """An item with its tensors, or (None) a cache reference."""
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=mm_hash,
                                 tensors=to_named(tensors) if tensors is not None else [])


class Gate:
    """Wraps a family's encode: records each forward's item count, and while closed holds the tower
    (the first forward blocks inside it, so later calls queue up behind it)."""

    def __init__(self, encode):
        self._encode = encode
        self.open = threading.Event()
        self.open.set()
        self.entered = threading.Event()
        self.forwards: list[int] = []

    def __call__(self, model, modality, items):
        self.forwards.append(len(items))
        self.entered.set()
        assert self.open.wait(60), "the test never opened the gate"
        return self._encode(model, modality, items)


class EncoderHarness:
    """An EncoderServicer behind production's start_server, its loop in a thread; sync helpers."""

    def __init__(self, model: Path, **cfg):
        self.servicer = EncoderServicer(Checkpoint(model), EncoderConfig(model=model, **cfg))
        self.family = self.servicer.family
        self.processor = self.family.load_processor(model)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = self.run(start_server(self.servicer, ServerConfig(port=0)))[0]
        self.channel = self.run(self._channel())
        self.stub = encoder_pb2_grpc.EncoderServiceStub(self.channel)

    async def _channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(self.server.address, options=CHANNEL_OPTIONS)

    def run(self, coro, timeout_s: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def request(self, *items: encoder_pb2.MediaItem) -> encoder_pb2.EncodeRequest:
        return encoder_pb2.EncodeRequest(model_fingerprint=self.servicer.checkpoint.fingerprint, items=items)

    async def _encode(self, request: encoder_pb2.EncodeRequest, timeout_s: float) -> encoder_pb2.EncodeResponse:
        return await self.stub.Encode(request, timeout=timeout_s)

    async def _stats(self) -> encoder_pb2.GetStatsResponse:
        return await self.stub.GetStats(encoder_pb2.GetStatsRequest())

    def encode(self, *items: encoder_pb2.MediaItem, timeout_s: float = 60) -> encoder_pb2.EncodeResponse:
        return self.run(self._encode(self.request(*items), timeout_s))

    def start(self, *items: encoder_pb2.MediaItem, timeout_s: float = 60):
        """An Encode call in flight: a concurrent future of its reply."""
        return asyncio.run_coroutine_threadsafe(self._encode(self.request(*items), timeout_s), self.loop)

    def stats(self) -> encoder_pb2.GetStatsResponse:
        return self.run(self._stats())

    def inputs(self, seed: int, width: int = 112, height: int = 112) -> dict[str, torch.Tensor]:
        return item_inputs(self.family, self.processor, width, height, seed)

    def alone(self, tensors: dict[str, torch.Tensor]):
        """The family's encode on this one item, outside the service (the reference)."""
        (out,) = self.family.encode(self.servicer.model, "image", [tensors])
        return out

    def close(self) -> None:
        async def stop():
            await self.channel.close()
            await self.server.stop(0)

        self.run(stop())
        self.servicer.batcher.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def wait_until(predicate, timeout_s: float = 30, what: str = "") -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
