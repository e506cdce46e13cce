"""Reading a request's media parts: bytes (inline or allowed file:// URLs), decoded within the limits,
and each item's identity (mm_hash).

What only the processor does with media: clients name files by file:// URL here, and the processor
names each item. Decoding is shared with the encoder: services/common/{media,video,audio}.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image
from transformers import ProcessorMixin
from transformers.video_utils import VideoMetadata

from services.common import tracing
from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.audio import Audio, AudioLimits, decode_audio
from services.common.config import ProcessorConfig
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.media import MediaLimits, check_media_size, decode_image
from services.common.video import Video, VideoLimits, decode_video, video_from_frames
from services.models import evs
from services.models.base import AUDIO, IMAGE, VIDEO, ModelFamily
from services.processor.embeds import EmbeddingSpec, Precomputed, read_embeddings


@dataclass
class RequestMedia:
    """A request's media parts as they are read, in prompt order."""

    images: list[Any] = field(default_factory=list)
    videos: list[Video] = field(default_factory=list)
    audios: list[Audio] = field(default_factory=list)
    modalities: list[str] = field(default_factory=list)  # one per item, in prompt order
    hashes: list[str] = field(default_factory=list)
    files: list[bytes | None] = field(default_factory=list)
    pruning_rates: dict[int, float] = field(default_factory=dict)  # item index -> EVS rate of a video to prune
    precomputed: dict[int, Precomputed] = field(default_factory=dict)  # item index -> the caller's embeddings


class MediaReader:
    """Reads one request's media parts within the processor's limits (--max-media-mib, --max-image-pixels,
    the video and audio limits, --allowed-media-dir) and names each item."""

    def __init__(self, cfg: ProcessorConfig, family: ModelFamily, hf_processor: ProcessorMixin, fingerprint: str,
                 embedding_spec: EmbeddingSpec):
        self.cfg = cfg
        self.family = family
        self.hf_processor = hf_processor
        self.fingerprint = fingerprint
        self.embedding_spec = embedding_spec
        self.limits = MediaLimits(max_bytes=cfg.max_media_mib << 20, max_image_pixels=cfg.max_image_pixels)
        self.video_limits = VideoLimits(max_frame_pixels=cfg.max_image_pixels, max_seconds=cfg.max_video_seconds,
                                        max_frames=cfg.max_video_frames, max_total_pixels=cfg.max_video_pixels)
        self.audio_limits = AudioLimits(max_seconds=cfg.max_audio_seconds)
        self.allowed_dirs = tuple(p.resolve() for p in cfg.allowed_media_dirs)

    @tracing.traced("media.decode")
    def read_part(self, kind: str, media: processor_pb2.Media, where: str, into: RequestMedia) -> None:
        """Decodes one media part (within the limits) and names it; appends it to the request's media."""
        cap = {IMAGE: self.cfg.max_images_per_request, VIDEO: self.cfg.max_videos_per_request,
               AUDIO: self.cfg.max_audios_per_request}[kind]
        if into.modalities.count(kind) >= cap:
            if kind == IMAGE:
                raise InvalidArgument(f"more than {cap} images in one request", reason="TOO_MANY_IMAGES",
                                      metadata={"maxImagesPerRequest": str(cap)})
            raise InvalidArgument(f"more than {cap} {kind} items in one request", reason="TOO_MANY_MEDIA_ITEMS",
                                  metadata={"modality": kind, "maxItems": str(cap)})
        source = media.WhichOneof("source")
        if kind != IMAGE and source == "embeddings" or kind != VIDEO and source == "frames":
            raise InvalidArgument(f"{where}: {source} are for {'image' if source == 'embeddings' else 'video'} "
                                  "parts only", reason="MEDIA_MISSING")
        file = None
        if kind == IMAGE and source == "embeddings":  # a stand-in image of the original size
            image, given = read_embeddings(media, self.embedding_spec, where)
            into.precomputed[len(into.modalities)] = given
            into.images.append(image)
            name = given.item.mm_hash
        elif kind == IMAGE:
            file = read_media(media, self.limits, self.allowed_dirs, where)
            image = decode_image(file, self.limits, where)
            into.images.append(image)
            name = mm_hash(image, media.uuid, self.fingerprint)
        elif kind == VIDEO:
            video = self._read_video(media, where)
            rate = self._pruning_rate(media.video_options, where)
            if rate:
                into.pruning_rates[len(into.modalities)] = rate
            into.videos.append(video)
            name = video_hash(video, media.uuid, self.fingerprint, rate)
        else:
            rate = self.family.audio_sampling_rate(self.hf_processor)
            audio = decode_audio(read_media(media, self.limits, self.allowed_dirs, where), rate,
                                 self.audio_limits, where)
            into.audios.append(audio)
            name = audio_hash(audio, media.uuid, self.fingerprint)
        into.modalities.append(kind)
        into.hashes.append(name)
        into.files.append(file)  # media mode sends images' files; other items go as tensors

    def _pruning_rate(self, options: processor_pb2.VideoOptions, where: str) -> float:
        """The video's EVS rate: the request's, else the server's; checked (0: no pruning)."""
        if not options.HasField("pruning_rate"):  # the server's, else what the checkpoint does by itself
            return self.cfg.video_pruning_rate or self.family.default_video_pruning_rate
        rate = evs.check_rate(options.pruning_rate, f"{where}.video_options.pruning_rate")
        if rate and not self.family.supports_video_pruning:
            raise InvalidArgument(f"{where}.video_options.pruning_rate: the {self.family.name} model has no video "
                                  "pruning (EVS); send 0 or leave it unset", reason="VIDEO_PRUNING_UNSUPPORTED",
                                  metadata={"family": self.family.name})
        return rate

    def _read_video(self, media: processor_pb2.Media, where: str) -> Video:
        """The frames the model sees: sampled by the family from the clip's header, and only they decoded;
        or the frames the caller sent, every one."""
        options = media.video_options
        for name, value in (("video_options.fps", options.fps), ("video_options.max_frames", options.max_frames),
                            ("frames.fps", media.frames.fps)):
            if not 0 <= value < float("inf"):
                raise InvalidArgument(f"{where}.{name} is {value}; it must be finite and at least 0 (0: the "
                                      "server's default)", reason="VIDEO_OPTIONS_INVALID")
        if media.WhichOneof("source") == "frames":
            if len(media.frames.frames) > self.video_limits.max_frames:
                raise InvalidArgument(f"{where}: {len(media.frames.frames)} frames; the limit is "
                                      f"{self.video_limits.max_frames}", reason="VIDEO_TOO_LARGE",
                                      metadata={"maxVideoFrames": str(self.video_limits.max_frames)})
            frames = [np.asarray(decode_image(check_media_size(data, self.limits, f"{where}.frames[{i}]"), self.limits,
                                              f"{where}.frames[{i}]").convert("RGB"))
                      for i, data in enumerate(media.frames.frames)]
            return video_from_frames(frames, media.frames.fps or self.cfg.video_fps, self.video_limits, where)
        fps = options.fps or self.cfg.video_fps
        max_frames = min(options.max_frames or self.video_limits.max_frames, self.video_limits.max_frames)
        data = read_media(media, self.limits, self.allowed_dirs, where)

        def choose(metadata: VideoMetadata) -> list[int]:
            try:
                return self.family.video_frame_indices(self.hf_processor, metadata, fps, max_frames)
            # The video processor's sampler refuses, e.g. more frames than the clip has; or divides by zero:
            # Qwen2-VL's rounds max_frames 1 down to 0 frames of its temporal patch of 2 (found by the fuzzer).
            except (ValueError, ZeroDivisionError) as err:
                raise InvalidArgument(f"{where}: the model's video processor cannot sample {metadata.total_num_frames} "
                                      f"frames at {fps:g} fps, at most {max_frames}: {err}",
                                      reason="PROCESSOR_REJECTED") from err

        return decode_video(data, self.video_limits, choose, where)


def read_media(media: processor_pb2.Media, limits: MediaLimits, allowed_dirs: tuple[Path, ...], where: str) -> bytes:
    """The encoded bytes of a media item, from inline data or a file:// URL inside an allowed dir."""
    source = media.WhichOneof("source")
    if source == "data":
        data = media.data
    elif source == "url":
        data = _read_url(media.url, limits, allowed_dirs, where)
    else:
        raise InvalidArgument(f"{where}: set data (the file's bytes) or url", reason="MEDIA_MISSING")
    return check_media_size(data, limits, where)


def _read_url(url: str, limits: MediaLimits, allowed_dirs: tuple[Path, ...], where: str) -> bytes:
    try:
        parsed = urlparse(url)
    except ValueError as err:  # e.g. "http://[": urlparse refuses an unclosed IPv6 host (found by the fuzzer)
        raise InvalidArgument(f"{where}: the url is not a URL ({err}); send a file:///absolute/path URL",
                              reason="MEDIA_URL_INVALID") from err
    if parsed.scheme in ("http", "https"):
        raise InvalidArgument(f"{where}: {parsed.scheme} URLs are not fetched by this server; send the bytes "
                              "inline in data", reason="MEDIA_URL_SCHEME_UNSUPPORTED")
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise InvalidArgument(f"{where}: {url!r} is not a file:///absolute/path URL", reason="MEDIA_URL_INVALID")
    path = Path(unquote(parsed.path))
    if "\0" in str(path):  # no OS path holds NUL: os.path.realpath raised ValueError (found by the fuzzer)
        raise InvalidArgument(f"{where}: the path holds a NUL character", reason="MEDIA_URL_INVALID")
    try:
        return _read_file(path, limits, allowed_dirs, where)
    except OSError as err:  # found by the fuzzer: a name too long (ENAMETOOLONG) escaped as INTERNAL
        if err.errno == errno.ENAMETOOLONG:
            raise InvalidArgument(f"{where}: the path is too long for the file system",
                                  reason="MEDIA_URL_INVALID") from err
        raise NotFound(f"{where}: {path} cannot be read: {err.strerror}", reason="MEDIA_FILE_NOT_FOUND") from err


def _read_file(path: Path, limits: MediaLimits, allowed_dirs: tuple[Path, ...], where: str) -> bytes:
    resolved = Path(os.path.realpath(path))  # follows symlinks: a link out of the allowed dir is refused
    if not any(resolved.is_relative_to(d) for d in allowed_dirs):
        allowed = ", ".join(map(str, allowed_dirs)) or "none (start the processor with --allowed-media-dir)"
        raise PermissionDenied(f"{where}: {path} is outside the allowed media directories: {allowed}",
                               reason="MEDIA_PATH_NOT_ALLOWED")
    if not resolved.is_file():
        raise NotFound(f"{where}: {path} does not exist or is not a file", reason="MEDIA_FILE_NOT_FOUND")
    size = resolved.stat().st_size
    if size > limits.max_bytes:
        raise InvalidArgument(f"{where}: {path} has {size} bytes; the limit is {limits.max_bytes} bytes",
                              reason="MEDIA_TOO_LARGE", metadata={"maxMediaBytes": str(limits.max_bytes)})
    return resolved.read_bytes()


def mm_hash(image: Image.Image, uuid: str, fingerprint: str) -> str:
    """The item's identity: the caller's uuid, or a hash of the decoded pixels and the model."""
    return content_hash(uuid, fingerprint, f"image\0{image.mode}\0{image.size}", image.tobytes())


def video_hash(video: Video, uuid: str, fingerprint: str, pruning_rate: float = 0.0) -> str:
    """A video's identity: its sampled frames (which frames, of what size), its EVS pruning rate and the
    model. Frames are hashed as decoded, so a clip and the same frames re-encoded may differ: the pixels
    decide. A pruned video's embeddings are other rows than the unpruned one's: the rate is part of
    its hash, and of a caller's uuid (`uuid@evs=rate`); rate 0 leaves both as they were."""
    meta = video.metadata
    header = f"video\0{video.frames.shape}\0{meta.fps}\0{meta.total_num_frames}\0{list(meta.frames_indices)}"
    if pruning_rate:
        header += f"\0evs={pruning_rate!r}"
        uuid = uuid and f"{uuid}@evs={pruning_rate!r}"
    return content_hash(uuid, fingerprint, header, video.frames.tobytes())


def audio_hash(audio: Audio, uuid: str, fingerprint: str) -> str:
    """An audio clip's identity: its samples at the model's rate, and the model."""
    return content_hash(uuid, fingerprint, f"audio\0{audio.sampling_rate}", audio.samples.tobytes())


def content_hash(uuid: str, fingerprint: str, header: str, content: bytes) -> str:
    """The caller's uuid if set, else sha256 of the model, what the content is (`header`) and its bytes."""
    if uuid:
        return uuid
    digest = hashlib.sha256(f"{fingerprint}\0{header}\0".encode())
    digest.update(content)
    return digest.hexdigest()
