"""Decoding a video: read the container's metadata, choose frames, decode only those.

The family chooses which frames it wants from the metadata alone (its HF video processor's own
`sample_frames`, capped by the server); we then seek to each chosen frame's keyframe and decode
forward to it, so a 10-minute clip sampled at a few frames costs a few GOPs, not ten minutes of
decoding. Frame i is the i-th frame in presentation order, as transformers' pyav loader counts
them (it decodes everything and keeps the chosen indices), so the frames are the same pixels.

Every limit is checked before the expensive step it guards: bytes before opening, duration and
frame size from the header, the chosen frames' total pixels before any frame is decoded.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import av
import numpy as np
from transformers.video_utils import VideoMetadata

from services.common.errors import InvalidArgument


@dataclass(frozen=True)
class VideoLimits:
    """What one video may cost."""

    max_frame_pixels: int  # width * height of one frame
    max_seconds: float  # the clip's duration
    max_frames: int  # frames chosen for the model
    max_total_pixels: int  # chosen frames x frame pixels: the decoded frames' memory / 3 bytes


@dataclass(frozen=True)
class Video:
    """The frames a model sees of one video, and where they come from."""

    frames: np.ndarray  # [T, H, W, 3] uint8 RGB, the chosen frames in order
    metadata: VideoMetadata  # of the whole clip; frames_indices = the chosen frames' indices


# The family's choice of frames for a clip (ModelFamily.video_frame_indices, bound to its processor).
ChooseFrames = Callable[[VideoMetadata], Sequence[int]]


def decode_video(data: bytes, limits: VideoLimits, choose: ChooseFrames, where: str) -> Video:
    """The chosen frames of an encoded clip (mp4, webm, mkv, mov, animated GIF...)."""
    with _open(data, where) as container:
        metadata = _metadata(container, limits, where)
        indices = _checked_indices(choose(metadata), metadata, limits, where)
        frames = _decode_frames(container, metadata, indices, where)
    metadata.frames_indices = indices
    return Video(frames=frames, metadata=metadata)


def video_from_frames(frames: Sequence[np.ndarray], fps: float, limits: VideoLimits, where: str) -> Video:
    """A clip sent as its frames (decoded images, [H, W, 3] uint8 each), every frame kept: transformers
    does not sample a list of images either."""
    if not frames:
        raise InvalidArgument(f"{where}: the video has no frames", reason="VIDEO_DECODE_FAILED")
    shapes = {frame.shape for frame in frames}
    if len(shapes) != 1:
        raise InvalidArgument(f"{where}: the frames differ in size ({sorted(shapes)}); send frames of one size",
                              reason="VIDEO_DECODE_FAILED")
    height, width, _ = frames[0].shape
    metadata = VideoMetadata(total_num_frames=len(frames), fps=fps, width=width, height=height,
                             duration=len(frames) / fps, video_backend="frames")
    indices = _checked_indices(range(len(frames)), metadata, limits, where)
    metadata.frames_indices = indices
    return Video(frames=np.stack(frames), metadata=metadata)


# ---- the container ------------------------------------------------------------------------------
def _open(data: bytes, where: str) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError) as err:
        raise InvalidArgument(f"{where}: not a video file FFmpeg can read ({err})", reason="VIDEO_DECODE_FAILED") from None
    if not container.streams.video:
        container.close()
        raise InvalidArgument(f"{where}: the file has no video stream", reason="VIDEO_DECODE_FAILED")
    return container


def _metadata(container: av.container.InputContainer, limits: VideoLimits, where: str) -> VideoMetadata:
    """What transformers' pyav loader reports (frames, average fps), from the header; a stream that does
    not state its frame count (webm, mkv) gets duration x fps."""
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    if width <= 0 or height <= 0 or fps <= 0:
        raise InvalidArgument(f"{where}: the video stream states no frame size or rate ({width}x{height}, "
                              f"{fps} fps)", reason="VIDEO_DECODE_FAILED")
    if width * height > limits.max_frame_pixels:
        raise InvalidArgument(f"{where}: frames are {width}x{height} = {width * height} pixels; the limit is "
                              f"{limits.max_frame_pixels}", reason="VIDEO_TOO_LARGE",
                              metadata={"maxFramePixels": str(limits.max_frame_pixels)})
    seconds = _duration_s(container, stream)
    frames = stream.frames or round(seconds * fps)
    if seconds <= 0:
        seconds = frames / fps
    if seconds > limits.max_seconds:
        raise InvalidArgument(f"{where}: the video lasts {seconds:.1f} s; the limit is {limits.max_seconds:g} s",
                              reason="VIDEO_TOO_LONG", metadata={"maxVideoSeconds": f"{limits.max_seconds:g}"})
    if frames < 1:
        raise InvalidArgument(f"{where}: the video has no frames", reason="VIDEO_DECODE_FAILED")
    return VideoMetadata(total_num_frames=int(frames), fps=fps, width=width, height=height,
                         duration=frames / fps, video_backend="pyav")


def _duration_s(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else 0.0


def _checked_indices(chosen: Sequence[int], metadata: VideoMetadata, limits: VideoLimits, where: str) -> list[int]:
    indices = [int(i) for i in chosen]
    if not indices:
        raise InvalidArgument(f"{where}: no frames were chosen from a {metadata.total_num_frames}-frame video",
                              reason="VIDEO_DECODE_FAILED")
    if indices != sorted(indices) or indices[0] < 0 or indices[-1] >= metadata.total_num_frames:
        raise ValueError(f"frame indices {indices} are not ascending within 0..{metadata.total_num_frames - 1}")
    if len(indices) > limits.max_frames:
        raise InvalidArgument(f"{where}: {len(indices)} frames chosen; the limit is {limits.max_frames}. Lower the "
                              "sampling fps or max_frames", reason="VIDEO_TOO_LARGE",
                              metadata={"maxVideoFrames": str(limits.max_frames)})
    total = len(indices) * metadata.width * metadata.height
    if total > limits.max_total_pixels:
        raise InvalidArgument(f"{where}: {len(indices)} frames of {metadata.width}x{metadata.height} are {total} "
                              f"pixels; the limit is {limits.max_total_pixels}. Send fewer or smaller frames",
                              reason="VIDEO_TOO_LARGE", metadata={"maxVideoPixels": str(limits.max_total_pixels)})
    return indices


def _decode_frames(container: av.container.InputContainer, metadata: VideoMetadata, indices: list[int],
                   where: str) -> np.ndarray:
    """Frames `indices` (presentation order), each found by its timestamp after a seek to the keyframe
    before it; consecutive wanted frames close together are reached by decoding on instead."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    time_base = float(stream.time_base)
    start = stream.start_time or 0
    frame_ticks = 1 / (metadata.fps * time_base)  # one frame in stream ticks
    frames: list[np.ndarray] = []
    decoded = None  # the decoder's iterator, positioned after `last_pts`
    last_pts = None
    try:
        for index in indices:
            target = start + index * frame_ticks
            # Seek when the wanted frame is more than a second ahead (or behind): cheaper than decoding on.
            if decoded is None or last_pts is None or not 0 <= target - last_pts <= metadata.fps * frame_ticks:
                container.seek(int(target), stream=stream, backward=True, any_frame=False)
                decoded = container.decode(stream)
            frame = None
            for candidate in decoded:
                if candidate.pts is None:
                    continue
                last_pts = candidate.pts
                if candidate.pts >= target - frame_ticks / 2:  # the frame shown at index's time
                    frame = candidate
                    break
            if frame is None:  # the stream ended first (a frame count estimated from the duration)
                if not frames:
                    raise InvalidArgument(f"{where}: the video stream holds no decodable frame",
                                          reason="VIDEO_DECODE_FAILED")
                frames.append(frames[-1])  # the frame still on screen at that time
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
    except av.FFmpegError as err:
        raise InvalidArgument(f"{where}: the video is corrupt ({err})", reason="VIDEO_DECODE_FAILED") from None
    return np.stack(frames)
