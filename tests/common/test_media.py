"""services/common/media.py: size checks and decoding, as the processor and the encoder both run them."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from services.common.errors import InvalidArgument
from services.common.media import MediaLimits, check_media_size, decode_image
from tests.media import image_bytes

PNG = image_bytes(32, 24, seed=1)


@pytest.fixture
def limits() -> MediaLimits:
    return MediaLimits(max_bytes=1 << 20, max_image_pixels=10_000)


def _reason(caught) -> str:
    return caught.value.reason


@pytest.mark.parametrize(("data", "max_bytes", "reason"), [(b"", 100, "MEDIA_EMPTY"), (PNG, 100, "MEDIA_TOO_LARGE")])
def test_size_checks(data, max_bytes, reason):
    with pytest.raises(InvalidArgument) as caught:
        check_media_size(data, MediaLimits(max_bytes=max_bytes, max_image_pixels=10_000), "m")
    assert _reason(caught) == reason
    assert check_media_size(PNG, MediaLimits(max_bytes=len(PNG), max_image_pixels=1), "m") == PNG


def test_decode_keeps_mode_and_size(limits):
    image = decode_image(PNG, limits, "m")
    assert image.size == (32, 24) and image.mode == "RGB"
    buf = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 10)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), limits, "m").mode == "RGBA"  # the model's processor converts it


@pytest.mark.parametrize(("data", "reason"), [
    (b"not an image at all", "IMAGE_FORMAT_UNSUPPORTED"),
    (PNG[: len(PNG) // 2], "IMAGE_DECODE_FAILED"),
    (image_bytes(200, 100, seed=2), "IMAGE_TOO_LARGE"),  # 20000 pixels > 10000, refused before decoding
])
def test_bad_images_are_invalid_argument(limits, data, reason):
    with pytest.raises(InvalidArgument) as caught:
        decode_image(data, limits, "m")
    assert _reason(caught) == reason


def test_unsupported_format_is_refused(limits):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="ICO")
    with pytest.raises(InvalidArgument) as caught:
        decode_image(buf.getvalue(), limits, "m")
    assert _reason(caught) == "IMAGE_FORMAT_UNSUPPORTED"
