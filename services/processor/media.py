"""Reading and decoding media from a request: inline bytes or allowed file:// URLs.

Every failure is a gRPC status a user can act on; limits (bytes, pixels) are
checked before the expensive decode, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.errors import InvalidArgument, NotFound, PermissionDenied

# Formats Pillow decodes that we accept for images; anything else is INVALID_ARGUMENT.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


@dataclass(frozen=True)
class MediaLimits:
    allowed_dirs: tuple[Path, ...]
    max_bytes: int
    max_image_pixels: int


def read_media(media: processor_pb2.Media, limits: MediaLimits, where: str) -> bytes:
    """The encoded bytes of a media item, from inline data or a file:// URL inside an allowed dir."""
    source = media.WhichOneof("source")
    if source == "data":
        data = media.data
    elif source == "url":
        data = _read_url(media.url, limits, where)
    else:
        raise InvalidArgument(f"{where}: set data (the file's bytes) or url", reason="MEDIA_MISSING")
    if not data:
        raise InvalidArgument(f"{where}: the media is empty (0 bytes)", reason="MEDIA_EMPTY")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{where}: {len(data)} bytes; the limit is {limits.max_bytes} bytes",
                              reason="MEDIA_TOO_LARGE", metadata={"maxMediaBytes": str(limits.max_bytes)})
    return data


def _read_url(url: str, limits: MediaLimits, where: str) -> bytes:
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise InvalidArgument(f"{where}: {parsed.scheme} URLs are not fetched by this server; send the bytes "
                              "inline in data", reason="MEDIA_URL_SCHEME_UNSUPPORTED")
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        raise InvalidArgument(f"{where}: {url!r} is not a file:///absolute/path URL", reason="MEDIA_URL_INVALID")
    path = Path(unquote(parsed.path))
    resolved = Path(os.path.realpath(path))  # follows symlinks: a link out of the allowed dir is refused
    if not any(resolved.is_relative_to(d) for d in limits.allowed_dirs):
        allowed = ", ".join(map(str, limits.allowed_dirs)) or "none (start the processor with --allowed-media-dir)"
        raise PermissionDenied(f"{where}: {path} is outside the allowed media directories: {allowed}",
                               reason="MEDIA_PATH_NOT_ALLOWED")
    if not resolved.is_file():
        raise NotFound(f"{where}: {path} does not exist or is not a file", reason="MEDIA_FILE_NOT_FOUND")
    size = resolved.stat().st_size
    if size > limits.max_bytes:
        raise InvalidArgument(f"{where}: {path} has {size} bytes; the limit is {limits.max_bytes} bytes",
                              reason="MEDIA_TOO_LARGE", metadata={"maxMediaBytes": str(limits.max_bytes)})
    return resolved.read_bytes()


def decode_image(data: bytes, limits: MediaLimits, where: str) -> Image.Image:
    """A fully decoded PIL image (first frame of an animation), mode as stored in the file.

    The mode is left to the model's processor, which converts it the way transformers
    does (e.g. transparency onto white), so we see exactly what the whole model sees.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise InvalidArgument(f"{where}: {image.format} images are not supported; send "
                                      f"{', '.join(sorted(IMAGE_FORMATS))}", reason="IMAGE_FORMAT_UNSUPPORTED")
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise InvalidArgument(f"{where}: image is {width}x{height} = {width * height} pixels; the limit is "
                                      f"{limits.max_image_pixels}", reason="IMAGE_TOO_LARGE",
                                      metadata={"maxImagePixels": str(limits.max_image_pixels)})
            image.load()
    except UnidentifiedImageError:
        raise InvalidArgument(f"{where}: not an image file Pillow can identify; send "
                              f"{', '.join(sorted(IMAGE_FORMATS))}", reason="IMAGE_FORMAT_UNSUPPORTED") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise InvalidArgument(f"{where}: the image is corrupt or truncated ({err})", reason="IMAGE_DECODE_FAILED") from None
    if width == 0 or height == 0:
        raise InvalidArgument(f"{where}: image is {width}x{height}", reason="IMAGE_DECODE_FAILED")
    return image


def mm_hash(image: Image.Image, uuid: str, fingerprint: str) -> str:
    """The item's identity: the caller's uuid, or a hash of the decoded pixels and the model."""
    if uuid:
        return uuid
    digest = hashlib.sha256(f"{fingerprint}\0image\0{image.mode}\0{image.size}\0".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
