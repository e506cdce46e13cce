"""Reading media from a request (inline bytes or allowed file:// URLs) and the items' identity.

What only the processor does with media: clients name files by file:// URL here, and the processor
names each item (mm_hash). Decoding is shared with the encoder: services/common/media.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.audio import Audio
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.media import MediaLimits, check_media_size
from services.common.video import Video


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
