"""services/common/video.py: the frames we seek to are the frames transformers' loader decodes in
full, in every container we accept; limits are checked before decoding; bad files are clear errors."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest
from transformers.video_utils import VideoMetadata

from services.common import video as video_module
from services.common.errors import InvalidArgument
from services.common.video import VideoLimits, decode_video, video_from_frames
from tests.media import image_bytes, video_bytes

LIMITS = VideoLimits(max_frame_pixels=1 << 20, max_seconds=3600, max_frames=64, max_total_pixels=1 << 26)


def _all_frames(data: bytes) -> list[np.ndarray]:
    """Every frame in presentation order, as transformers' pyav loader decodes them (no seeking)."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def _gif(frames: int = 20) -> bytes:
    from PIL import Image

    images = [Image.fromarray(np.full((64, 96, 3), (i * 12) % 256, np.uint8)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()


CLIPS = {
    "mp4-h264": video_bytes(seconds=4, fps=10, seed=1),  # B-frames, one keyframe
    "mp4-h264-gop5": video_bytes(seconds=4, fps=10, seed=2, gop=5),
    "webm-vp9": video_bytes(seconds=4, fps=10, seed=3, fmt="webm", codec="libvpx-vp9", gop=7),  # no frame count in header
    "mkv-h264": video_bytes(seconds=4, fps=10, seed=4, fmt="matroska", gop=6),
    "mp4-mpeg4": video_bytes(seconds=4, fps=10, seed=5, codec="mpeg4", gop=4),
}


@pytest.mark.parametrize("name", list(CLIPS))
@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [0, 13, 26, 39], [5, 30, 31, 38], list(range(0, 40, 3)), [39]])
def test_sought_frames_equal_a_full_decode(name, indices):
    data = CLIPS[name]
    full = _all_frames(data)
    assert len(full) == 40
    video = decode_video(data, LIMITS, lambda metadata: indices, "v")
    assert video.metadata.frames_indices == indices
    assert (video.metadata.total_num_frames, video.metadata.fps, video.metadata.width) == (40, 10.0, 96)
    for frame, index in zip(video.frames, indices, strict=True):
        assert np.array_equal(frame, full[index]), f"frame {index} differs"


def test_animated_gif():
    data = _gif()
    full = _all_frames(data)
    video = decode_video(data, LIMITS, lambda metadata: [0, 7, 19], "v")
    assert video.metadata.total_num_frames == 20 and video.metadata.fps == 10.0
    assert all(np.array_equal(f, full[i]) for f, i in zip(video.frames, [0, 7, 19]))


def test_choice_sees_the_header_metadata():
    seen: list[VideoMetadata] = []
    decode_video(CLIPS["mp4-h264"], LIMITS, lambda metadata: seen.append(metadata) or [0], "v")
    assert seen[0].total_num_frames == 40 and seen[0].duration == 4.0 and seen[0].height == 64


class _CountingContainer:
    """An av container whose decoder counts the frames it hands out."""

    def __init__(self, container, counter: list[int]):
        self._container, self._counter = container, counter

    def __getattr__(self, name):
        return getattr(self._container, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._container.close()

    def decode(self, *args, **kwargs):
        for frame in self._container.decode(*args, **kwargs):
            self._counter[0] += 1
            yield frame


def test_a_long_clip_is_not_decoded_whole(monkeypatch):
    """Four frames of a 600-frame clip (keyframe every 10) cost a few GOPs of decoding, not 600 frames."""
    data = video_bytes(seconds=60, fps=10, seed=6, gop=10)
    counter = [0]
    real_open = av.open
    monkeypatch.setattr(video_module.av, "open", lambda *a, **k: _CountingContainer(real_open(*a, **k), counter))
    indices = [0, 200, 400, 599]
    video = decode_video(data, LIMITS, lambda metadata: indices, "v")
    monkeypatch.undo()
    full = _all_frames(data)
    assert all(np.array_equal(f, full[i]) for f, i in zip(video.frames, indices))
    assert len(indices) <= counter[0] <= len(indices) * 11, f"decoded {counter[0]} frames for {len(indices)}"


@pytest.mark.parametrize(("limits", "reason", "key"), [
    (VideoLimits(max_frame_pixels=96 * 64 - 1, max_seconds=3600, max_frames=64, max_total_pixels=1 << 26),
     "VIDEO_TOO_LARGE", "maxFramePixels"),
    (VideoLimits(max_frame_pixels=1 << 20, max_seconds=3.5, max_frames=64, max_total_pixels=1 << 26),
     "VIDEO_TOO_LONG", "maxVideoSeconds"),
    (VideoLimits(max_frame_pixels=1 << 20, max_seconds=3600, max_frames=3, max_total_pixels=1 << 26),
     "VIDEO_TOO_LARGE", "maxVideoFrames"),
    (VideoLimits(max_frame_pixels=1 << 20, max_seconds=3600, max_frames=64, max_total_pixels=96 * 64 * 4 - 1),
     "VIDEO_TOO_LARGE", "maxVideoPixels"),
])
def test_limits_are_checked_before_decoding(monkeypatch, limits, reason, key):
    monkeypatch.setattr(video_module, "_decode_frames", lambda *a: pytest.fail("decoded past a limit"))
    with pytest.raises(InvalidArgument) as caught:
        decode_video(CLIPS["mp4-h264"], limits, lambda metadata: [0, 10, 20, 30], "v")
    assert caught.value.reason == reason and key in caught.value.metadata


@pytest.mark.parametrize("data", [b"not a video at all" * 20, image_bytes(32, 32), CLIPS["mp4-h264"][:300],
                                  b"RIFF\x00\x00\x00\x00WAVE"])
def test_not_a_video(data):
    with pytest.raises(InvalidArgument) as caught:
        decode_video(data, LIMITS, lambda metadata: [0], "v")
    assert caught.value.reason == "VIDEO_DECODE_FAILED"


def test_corrupt_stream_is_an_error_or_the_frames_it_has():
    """Garbage in the middle of a clip: FFmpeg conceals what it can; what comes back is frames, never a crash."""
    data = bytearray(CLIPS["mp4-h264-gop5"])
    data[len(data) // 2 : len(data) // 2 + 400] = bytes(400)
    try:
        video = decode_video(bytes(data), LIMITS, lambda metadata: [0, 20, 39], "v")
    except InvalidArgument as err:
        assert err.reason == "VIDEO_DECODE_FAILED"
    else:
        assert video.frames.shape == (3, 64, 96, 3)


def test_frames_sent_as_images():
    frames = [np.full((8, 12, 3), i, np.uint8) for i in range(5)]
    video = video_from_frames(frames, 4.0, LIMITS, "v")
    assert video.frames.shape == (5, 8, 12, 3) and video.metadata.frames_indices == [0, 1, 2, 3, 4]
    assert video.metadata.fps == 4.0 and video.metadata.duration == 1.25
    for bad in ([], [frames[0], np.zeros((9, 12, 3), np.uint8)]):
        with pytest.raises(InvalidArgument) as caught:
            video_from_frames(bad, 4.0, LIMITS, "v")
        assert caught.value.reason == "VIDEO_DECODE_FAILED"


def test_a_header_without_a_frame_count_gives_duration_times_rate():
    seen: list[VideoMetadata] = []
    decode_video(CLIPS["webm-vp9"], LIMITS, lambda metadata: seen.append(metadata) or [0], "v")
    assert (seen[0].total_num_frames, seen[0].fps, seen[0].duration) == (40, 10.0, 4.0)
