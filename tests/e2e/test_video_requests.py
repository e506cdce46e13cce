"""Video through the processor as a user sends it (Qwen2-VL services, separate processes): frames sent
as images, per-request sampling, and every bad video or option a clear status, the service serving on."""

from __future__ import annotations

import io
import json

import av
import grpc
import numpy as np
import pytest

from services.cli import main
from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import audio_bytes, image_bytes, video_bytes
from tests.reference import OtherMedia, hf_generate

pytestmark = pytest.mark.e2e

CLIP = video_bytes(seconds=2, fps=8, seed=7)  # 16 frames; 2 fps samples 4 of them
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="module")
def stub(qwen2_vl_services):
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def _generate(stub, parts) -> processor_pb2.Completion:
    request = processor_pb2.GenerateRequest(
        messages=[processor_pb2.ChatMessage(role="user", content=[*parts, processor_pb2.ContentPart(text="What happens?")])],
        sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    return stub.Generate(request, timeout=120).completion


def _video(**media) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(video=processor_pb2.Media(**media))


def _png_frames(data: bytes, indices: list[int]) -> list[bytes]:
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_image() for i, f in enumerate(container.decode(video=0)) if i in indices]
    out = []
    for frame in frames:
        buf = io.BytesIO()
        frame.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def test_frames_sent_as_images_give_the_clips_tokens(stub, qwen2_vl_dir):
    """The 4 frames 2 fps picks from the 8 fps clip, sent as PNGs at 2 fps: what transformers makes of the clip."""
    expected = hf_generate(qwen2_vl_dir, "What happens?", [], MAX_NEW_TOKENS, other=OtherMedia(videos=(CLIP,)))
    frames = processor_pb2.VideoFrames(frames=_png_frames(CLIP, [0, 4, 8, 12]), fps=2.0)
    assert list(_generate(stub, [_video(frames=frames)]).token_ids) == expected
    assert list(_generate(stub, [_video(data=CLIP)]).token_ids) == expected


def test_per_request_sampling_changes_the_frames(stub, qwen2_vl_dir):
    """fps 4 takes 8 frames (grid t = 4): transformers sampling at 4 fps agrees, and the prompt is longer."""
    expected = hf_generate(qwen2_vl_dir, "What happens?", [], MAX_NEW_TOKENS,
                           other=OtherMedia(videos=(CLIP,), video_fps=4.0))
    denser = _generate(stub, [_video(data=CLIP, video_options=processor_pb2.VideoOptions(fps=4.0))])
    assert list(denser.token_ids) == expected
    assert denser.prompt_tokens > _generate(stub, [_video(data=CLIP)]).prompt_tokens
    every = _generate(stub, [_video(data=CLIP, video_options=processor_pb2.VideoOptions(fps=1000))])
    assert every.prompt_tokens > denser.prompt_tokens  # an absurd rate takes every frame (16), no more
    capped = _generate(stub, [_video(data=CLIP, video_options=processor_pb2.VideoOptions(fps=4.0, max_frames=4))])
    assert capped.prompt_tokens == _generate(stub, [_video(data=CLIP)]).prompt_tokens  # 4 frames either way


def _expect(stub, reason, parts, code=grpc.StatusCode.INVALID_ARGUMENT):
    with pytest.raises(grpc.RpcError) as caught:
        _generate(stub, parts)
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason, caught.value.details()
    assert _generate(stub, [_video(data=CLIP)]).completion_tokens > 0  # and it goes on serving video
    return caught.value


def _no_frames_mp4() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()  # the header, and not one frame
    assert buf.getvalue()
    return buf.getvalue()


@pytest.mark.parametrize(("parts", "reason"), [
    ([_video(data=b"this is not a video file" * 8)], "VIDEO_DECODE_FAILED"),
    ([_video(data=image_bytes(32, 32))], "VIDEO_DECODE_FAILED"),  # an image where a video belongs
    ([_video(data=CLIP[: len(CLIP) // 3])], "VIDEO_DECODE_FAILED"),  # truncated: the index is at the end
    ([_video(data=_no_frames_mp4())], "VIDEO_DECODE_FAILED"),
    ([_video(frames=processor_pb2.VideoFrames(frames=[image_bytes(32, 32), image_bytes(48, 32)]))],
     "VIDEO_DECODE_FAILED"),  # frames of two sizes
    ([_video(frames=processor_pb2.VideoFrames(frames=[b"not an image"]))], "IMAGE_FORMAT_UNSUPPORTED"),
    ([_video(data=CLIP, video_options=processor_pb2.VideoOptions(fps=-1))], "VIDEO_OPTIONS_INVALID"),
    ([_video(data=CLIP, video_options=processor_pb2.VideoOptions(fps=float("nan")))], "VIDEO_OPTIONS_INVALID"),
    ([processor_pb2.ContentPart(image=processor_pb2.Media(frames=processor_pb2.VideoFrames(frames=[image_bytes(8, 8)])))],
     "MEDIA_MISSING"),
    ([processor_pb2.ContentPart(audio=processor_pb2.Media(data=audio_bytes()))], "MODALITY_UNSUPPORTED"),
    ([_video(data=CLIP)] * 5, "TOO_MANY_MEDIA_ITEMS"),
])
def test_bad_video_requests(stub, parts, reason):
    _expect(stub, reason, parts)


def test_a_video_of_huge_frames_is_refused_from_its_header(stub):
    err = _expect(stub, "VIDEO_TOO_LARGE", [_video(frames=processor_pb2.VideoFrames(
        frames=[image_bytes(64, 64)] * 40))])  # more frames than --max-video-frames (32)
    assert error_info(err).metadata["maxVideoFrames"] == "32"


def test_cli_sends_video_and_image_in_order(qwen2_vl_services, tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(CLIP)
    (tmp_path / "a.png").write_bytes(image_bytes(64, 64, seed=3))
    argv = ["generate", "--server", qwen2_vl_services.address, "--prompt", "What happens?", "--max-new-tokens", "4",
            "--json", "--video", str(tmp_path / "clip.mp4"), "--image", str(tmp_path / "a.png")]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        same = stub.Generate(processor_pb2.GenerateRequest(
            messages=build_messages("What happens?", media=[("video", CLIP), ("image", image_bytes(64, 64, seed=3))]),
            sampling=generation_pb2.SamplingParams(max_new_tokens=4)), timeout=60).completion
    assert got["token_ids"] == list(same.token_ids) and got["prompt_tokens"] == same.prompt_tokens
