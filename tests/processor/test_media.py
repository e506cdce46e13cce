"""services/processor/media.py: reading media (inline, file:// in allowed dirs), decoding, identity."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.processor.media import MediaLimits, decode_image, mm_hash, read_media
from tests.media import image_bytes

PNG = image_bytes(32, 24, seed=1)


@pytest.fixture
def limits(tmp_path) -> MediaLimits:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    return MediaLimits(allowed_dirs=(allowed.resolve(),), max_bytes=1 << 20, max_image_pixels=10_000)


def _reason(caught) -> str:
    return caught.value.reason


def test_inline_bytes_are_read(limits):
    assert read_media(processor_pb2.Media(data=PNG), limits, "m") == PNG


@pytest.mark.parametrize(("media", "reason"), [
    (processor_pb2.Media(), "MEDIA_MISSING"),
    (processor_pb2.Media(data=b""), "MEDIA_EMPTY"),
    (processor_pb2.Media(url="https://example.com/cat.png"), "MEDIA_URL_SCHEME_UNSUPPORTED"),
    (processor_pb2.Media(url="file://otherhost/x.png"), "MEDIA_URL_INVALID"),
    (processor_pb2.Media(url="cat.png"), "MEDIA_URL_INVALID"),
])
def test_unusable_sources_are_invalid_argument(limits, media, reason):
    with pytest.raises(InvalidArgument) as caught:
        read_media(media, limits, "messages[0].content[0]")
    assert _reason(caught) == reason and "messages[0].content[0]" in caught.value.message


def test_too_many_bytes_inline_and_on_disk(limits, tmp_path):
    small = MediaLimits(limits.allowed_dirs, max_bytes=100, max_image_pixels=limits.max_image_pixels)
    with pytest.raises(InvalidArgument) as caught:
        read_media(processor_pb2.Media(data=PNG), small, "m")
    assert _reason(caught) == "MEDIA_TOO_LARGE" and caught.value.metadata == {"maxMediaBytes": "100"}
    path = limits.allowed_dirs[0] / "big.png"
    path.write_bytes(PNG)
    with pytest.raises(InvalidArgument) as caught:
        read_media(processor_pb2.Media(url=path.as_uri()), small, "m")
    assert _reason(caught) == "MEDIA_TOO_LARGE"


def test_file_urls_inside_allowed_dirs_only(limits, tmp_path):
    inside = limits.allowed_dirs[0] / "in.png"
    inside.write_bytes(PNG)
    assert read_media(processor_pb2.Media(url=inside.as_uri()), limits, "m") == PNG

    outside = tmp_path / "out.png"
    outside.write_bytes(PNG)
    with pytest.raises(PermissionDenied) as caught:
        read_media(processor_pb2.Media(url=outside.as_uri()), limits, "m")
    assert _reason(caught) == "MEDIA_PATH_NOT_ALLOWED"

    link = limits.allowed_dirs[0] / "link.png"  # a symlink out of the allowed dir is refused too
    link.symlink_to(outside)
    with pytest.raises(PermissionDenied):
        read_media(processor_pb2.Media(url=link.as_uri()), limits, "m")

    with pytest.raises(PermissionDenied):  # .. cannot climb out either
        read_media(processor_pb2.Media(url=f"file://{limits.allowed_dirs[0]}/../out.png"), limits, "m")

    with pytest.raises(NotFound) as caught:
        read_media(processor_pb2.Media(url=(limits.allowed_dirs[0] / "missing.png").as_uri()), limits, "m")
    assert _reason(caught) == "MEDIA_FILE_NOT_FOUND"


def test_no_allowed_dirs_says_how_to_allow(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    with pytest.raises(PermissionDenied) as caught:
        read_media(processor_pb2.Media(url=path.as_uri()), MediaLimits((), 1 << 20, 10_000), "m")
    assert "--allowed-media-dir" in caught.value.message


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


def test_mm_hash_is_pixels_and_model_or_the_callers_uuid(limits):
    a = decode_image(PNG, limits, "m")
    same_pixels_other_file = decode_image(image_bytes(32, 24, seed=1, fmt="BMP"), limits, "m")
    other = decode_image(image_bytes(32, 24, seed=2), limits, "m")
    assert mm_hash(a, "", "fp1") == mm_hash(same_pixels_other_file, "", "fp1")  # decoded pixels, not file bytes
    assert mm_hash(a, "", "fp1") != mm_hash(other, "", "fp1")
    assert mm_hash(a, "", "fp1") != mm_hash(a, "", "fp2")  # another model: another identity
    assert mm_hash(a, "my-id", "fp1") == "my-id"
