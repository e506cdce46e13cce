"""Decoding media bytes, the one way both the processor and the encoder do it.

The processor decodes what a client sent (to hash it and run the HF processor); in media mode
the encoder decodes the same bytes again to run the HF processor next to the tower. Both must see
the same pixels, so both call these functions with their own limits. Every failure is an
INVALID_ARGUMENT a user can act on; limits (bytes, pixels) are checked before the expensive decode,
so a decompression bomb costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from services.common.errors import InvalidArgument

# Formats Pillow decodes that we accept for images; anything else is INVALID_ARGUMENT.
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


@dataclass(frozen=True)
class MediaLimits:
    """What one media item may cost before and during decoding."""

    max_bytes: int  # encoded bytes of one item
    max_image_pixels: int  # width * height, the decompression-bomb cap


def check_media_size(data: bytes, limits: MediaLimits, where: str) -> bytes:
    """`data`, unless it is empty or over the byte limit."""
    if not data:
        raise InvalidArgument(f"{where}: the media is empty (0 bytes)", reason="MEDIA_EMPTY")
    if len(data) > limits.max_bytes:
        raise InvalidArgument(f"{where}: {len(data)} bytes; the limit is {limits.max_bytes} bytes",
                              reason="MEDIA_TOO_LARGE", metadata={"maxMediaBytes": str(limits.max_bytes)})
    return data


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
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow's own cap (89 Mpx warns, 179 Mpx fails) fires in Image.open, before the check above can
        # read the size: the same refusal, not a "corrupt" image (a 20000x20000 bomb is a valid PNG).
        raise InvalidArgument(f"{where}: image is too large to decode ({err}); the limit is "
                              f"{limits.max_image_pixels} pixels", reason="IMAGE_TOO_LARGE",
                              metadata={"maxImagePixels": str(limits.max_image_pixels)}) from None
    except UnidentifiedImageError:
        raise InvalidArgument(f"{where}: not an image file Pillow can identify; send "
                              f"{', '.join(sorted(IMAGE_FORMATS))}", reason="IMAGE_FORMAT_UNSUPPORTED") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidArgument(f"{where}: the image is corrupt or truncated ({err})", reason="IMAGE_DECODE_FAILED") from None
    if width == 0 or height == 0:
        raise InvalidArgument(f"{where}: image is {width}x{height}", reason="IMAGE_DECODE_FAILED")
    return image
