"""Media mode in the encoder (services/encoder/media_inputs.py): an image sent as its compressed file
gives bitwise the embeddings of the tensors the processor service would have sent, for every family
that serves images; bad media is refused with the processor's reasons and the encoder keeps serving.

Each family runs a real port-0 encoder server in this process; the tensor side is built the way the
processor service builds it (the decoded images through the family's `preprocess` on one prompt
with both images), the media side sends only the files.
"""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig, ServerConfig
from services.common.errors import InvalidArgument, error_info
from services.common.media import MediaLimits, decode_image
from services.common.tensors import from_proto, to_named
from services.encoder.server import start_server
from services.encoder.servicer import EncoderServicer
from services.models.base import IMAGE, VIDEO
from services.models.checkpoint import Checkpoint
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes

FAMILIES = ("mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl", "gemma3", "phi4mm",
            "nemotron_h_omni", "idefics3", "mistral3", "aya_vision", "llava_onevision", "llava_next_video", "glm4v",
            "qwen3_5")


def _translucent_png(width: int, height: int) -> bytes:
    """RGBA with varying alpha: the HF processor composites it onto white; PIL's convert("RGB") would not."""
    rgba = np.random.default_rng(7).integers(0, 256, (height, width, 4), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


# Images of other sizes and aspects, PNG (one translucent) and JPEG: tiling and grids differ between
# them, and the processor pads the smaller ones in a batch (LLaVA-NeXT, Phi-4-MM, Pixtral, Idefics3).
FILES = (image_bytes(200, 120, seed=3, kind="gradient"), image_bytes(96, 160, seed=4, fmt="JPEG"),
         _translucent_png(72, 72))
LIMITS = MediaLimits(max_bytes=32 << 20, max_image_pixels=50_000_000)


def _encode(servicer: EncoderServicer, *requests: encoder_pb2.EncodeRequest) -> list:
    """Each request on one port-0 server: its reply, or the gRPC error it ended with."""
    async def body():
        server, _ = await start_server(servicer, ServerConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = encoder_pb2_grpc.EncoderServiceStub(channel)
                replies = []
                for request in requests:
                    try:
                        replies.append(await stub.Encode(request, timeout=120))
                    except grpc.aio.AioRpcError as err:
                        replies.append(err)
                return replies
        finally:
            await server.stop(0)

    return asyncio.run(body())


def _request(servicer, items: list[encoder_pb2.MediaItem]) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(model_fingerprint=servicer.checkpoint.fingerprint, items=items)


def _media_item(data: bytes, mm_hash: str = "m") -> encoder_pb2.MediaItem:
    return encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=mm_hash,
                                 media=encoder_pb2.EncodedMedia(data=data))


def _tensor_items(servicer: EncoderServicer) -> list[encoder_pb2.MediaItem]:
    """What the processor service sends in tensor mode for a prompt with both images."""
    family, processor = servicer.family, servicer.media_inputs.processor
    content = [{"type": IMAGE}, {"type": "text", "text": "Compare"}, {"type": IMAGE}, {"type": IMAGE}]
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    images = [decode_image(data, LIMITS, "test") for data in FILES]
    items = family.preprocess(processor, text, images).items
    return [encoder_pb2.MediaItem(modality=tensor_pb2.MODALITY_IMAGE, mm_hash=f"h{i}", tensors=to_named(it.encoder_inputs))
            for i, it in enumerate(items)]


@pytest.mark.parametrize("family", FAMILIES)
def test_media_mode_embeddings_equal_tensor_mode_bitwise(family):
    model_dir = tiny_checkpoint(family)
    servicer = EncoderServicer(Checkpoint(model_dir), EncoderConfig(model=model_dir, torch_threads=1))
    tensor_items = _tensor_items(servicer)
    media_items = [_media_item(data, f"h{i}") for i, data in enumerate(FILES)]
    by_tensors, by_media = _encode(servicer, _request(servicer, tensor_items), _request(servicer, media_items))
    assert [e.mm_hash for e in by_media.items] == ["h0", "h1", "h2"]
    for expected, got in zip(by_tensors.items, by_media.items, strict=True):
        field = "cross_attention_states" if expected.HasField("cross_attention_states") else "embeddings"  # mllama
        assert torch.equal(from_proto(getattr(expected, field)), from_proto(getattr(got, field)))
        assert len(expected.deepstack_embeddings) == len(got.deepstack_embeddings)
        for a, b in zip(expected.deepstack_embeddings, got.deepstack_embeddings):
            assert torch.equal(from_proto(a), from_proto(b))
    media_bytes = sum(item.ByteSize() for item in media_items)
    tensor_bytes = sum(item.ByteSize() for item in tensor_items)
    assert media_bytes < tensor_bytes, (media_bytes, tensor_bytes)  # the point of the mode


@pytest.fixture(scope="module")
def qwen_servicer(qwen2_vl_dir) -> EncoderServicer:
    return EncoderServicer(Checkpoint(qwen2_vl_dir), EncoderConfig(model=qwen2_vl_dir, max_image_pixels=200 * 200,
                                                                    max_media_mib=1, torch_threads=1))


def test_bad_media_is_refused_and_the_encoder_keeps_serving(qwen_servicer):
    good = FILES[0]
    cases = {
        "IMAGE_FORMAT_UNSUPPORTED": _media_item(b"not an image at all"),
        "IMAGE_DECODE_FAILED": _media_item(good[: len(good) // 2]),
        "MEDIA_EMPTY": _media_item(b""),
        "IMAGE_TOO_LARGE": _media_item(image_bytes(300, 200, seed=5)),  # 60000 pixels > 40000
        "MEDIA_TOO_LARGE": _media_item(image_bytes(190, 190, seed=6) + bytes(1 << 20)),
        "MEDIA_ITEM_INPUTS_CONFLICT": encoder_pb2.MediaItem(
            modality=tensor_pb2.MODALITY_IMAGE, mm_hash="m", media=encoder_pb2.EncodedMedia(data=good),
            tensors=_tensor_items(qwen_servicer)[0].tensors),
    }
    requests = [_request(qwen_servicer, [_media_item(good, "ok"), item]) for item in cases.values()]
    *refusals, served = _encode(qwen_servicer, *requests, _request(qwen_servicer, [_media_item(good, "ok")]))
    for reason, err in zip(cases, refusals, strict=True):
        assert isinstance(err, grpc.aio.AioRpcError), reason
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (reason, err.details())
        info = error_info(err)
        assert (info.reason, info.domain) == (reason, "triptych.encoder"), err.details()
        assert err.details().startswith("items[1]"), err.details()
    assert served.items[0].mm_hash == "ok" and from_proto(served.items[0].embeddings).shape[0] > 0


def test_media_item_goes_through_the_patch_budget(qwen_servicer, monkeypatch):
    """Pixels the encoder makes itself are still capped by --max-item-patches before the tower."""
    import dataclasses

    monkeypatch.setattr(qwen_servicer, "cfg", dataclasses.replace(qwen_servicer.cfg, max_item_patches=4))
    (err,) = _encode(qwen_servicer, _request(qwen_servicer, [_media_item(FILES[0])]))
    assert error_info(err).reason == "ITEM_TOO_LARGE"


def test_media_of_other_modalities_is_refused(qwen_servicer):
    """Only images are processed from files; a family that gains video or audio still gets its tensors."""
    with pytest.raises(InvalidArgument) as caught:
        qwen_servicer.media_inputs.encoder_inputs(_media_item(FILES[0]), VIDEO, "items[0]")
    assert caught.value.reason == "MEDIA_MODALITY_UNSUPPORTED"
