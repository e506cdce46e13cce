"""services/processor/media.py: reading media (inline, file:// in allowed dirs) and identity."""

from __future__ import annotations

import pytest

from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.media import MediaLimits, decode_image
from services.processor.media import mm_hash, read_media
from tests.media import image_bytes

PNG = image_bytes(32, 24, seed=1)


@pytest.fixture
def allowed(tmp_path) -> tuple:
    folder = tmp_path / "allowed"
    folder.mkdir()
    return (folder.resolve(),)


@pytest.fixture
def limits() -> MediaLimits:
    return MediaLimits(max_bytes=1 << 20, max_image_pixels=10_000)


def _reason(caught) -> str:
    return caught.value.reason


def test_inline_bytes_are_read(limits, allowed):
    assert read_media(processor_pb2.Media(data=PNG), limits, allowed, "m") == PNG


@pytest.mark.parametrize(("media", "reason"), [
    (processor_pb2.Media(), "MEDIA_MISSING"),
    (processor_pb2.Media(data=b""), "MEDIA_EMPTY"),
    (processor_pb2.Media(url="https://example.com/cat.png"), "MEDIA_URL_SCHEME_UNSUPPORTED"),
    (processor_pb2.Media(url="file://otherhost/x.png"), "MEDIA_URL_INVALID"),
    (processor_pb2.Media(url="cat.png"), "MEDIA_URL_INVALID"),
    # Found by tests/reliability/test_fuzz.py, each once an INTERNAL with a traceback:
    (processor_pb2.Media(url="A://["), "MEDIA_URL_INVALID"),  # urlparse: "Invalid IPv6 URL"
    (processor_pb2.Media(url="file:///x%00y"), "MEDIA_URL_INVALID"),  # realpath: "embedded null byte"
])
def test_unusable_sources_are_invalid_argument(limits, allowed, media, reason):
    with pytest.raises(InvalidArgument) as caught:
        read_media(media, limits, allowed, "messages[0].content[0]")
    assert _reason(caught) == reason and "messages[0].content[0]" in caught.value.message


def test_too_many_bytes_inline_and_on_disk(limits, allowed):
    small = MediaLimits(max_bytes=100, max_image_pixels=limits.max_image_pixels)
    with pytest.raises(InvalidArgument) as caught:
        read_media(processor_pb2.Media(data=PNG), small, allowed, "m")
    assert _reason(caught) == "MEDIA_TOO_LARGE" and caught.value.metadata == {"maxMediaBytes": "100"}
    path = allowed[0] / "big.png"
    path.write_bytes(PNG)
    with pytest.raises(InvalidArgument) as caught:
        read_media(processor_pb2.Media(url=path.as_uri()), small, allowed, "m")
    assert _reason(caught) == "MEDIA_TOO_LARGE"


def test_a_path_too_long_is_invalid(limits, allowed):
    """ENAMETOOLONG (found by the fuzzer: it escaped as INTERNAL)."""
    with pytest.raises(InvalidArgument) as caught:
        read_media(processor_pb2.Media(url=(allowed[0] / ("a" * 5000)).as_uri()), limits, allowed, "m")
    assert _reason(caught) == "MEDIA_URL_INVALID"


def test_file_urls_inside_allowed_dirs_only(limits, allowed, tmp_path):
    inside = allowed[0] / "in.png"
    inside.write_bytes(PNG)
    assert read_media(processor_pb2.Media(url=inside.as_uri()), limits, allowed, "m") == PNG

    outside = tmp_path / "out.png"
    outside.write_bytes(PNG)
    with pytest.raises(PermissionDenied) as caught:
        read_media(processor_pb2.Media(url=outside.as_uri()), limits, allowed, "m")
    assert _reason(caught) == "MEDIA_PATH_NOT_ALLOWED"

    link = allowed[0] / "link.png"  # a symlink out of the allowed dir is refused too
    link.symlink_to(outside)
    with pytest.raises(PermissionDenied):
        read_media(processor_pb2.Media(url=link.as_uri()), limits, allowed, "m")

    with pytest.raises(PermissionDenied):  # .. cannot climb out either
        read_media(processor_pb2.Media(url=f"file://{allowed[0]}/../out.png"), limits, allowed, "m")

    with pytest.raises(NotFound) as caught:
        read_media(processor_pb2.Media(url=(allowed[0] / "missing.png").as_uri()), limits, allowed, "m")
    assert _reason(caught) == "MEDIA_FILE_NOT_FOUND"


def test_no_allowed_dirs_says_how_to_allow(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    with pytest.raises(PermissionDenied) as caught:
        read_media(processor_pb2.Media(url=path.as_uri()), MediaLimits(1 << 20, 10_000), (), "m")
    assert "--allowed-media-dir" in caught.value.message


def test_mm_hash_is_pixels_and_model_or_the_callers_uuid(limits):
    a = decode_image(PNG, limits, "m")
    same_pixels_other_file = decode_image(image_bytes(32, 24, seed=1, fmt="BMP"), limits, "m")
    other = decode_image(image_bytes(32, 24, seed=2), limits, "m")
    assert mm_hash(a, "", "fp1") == mm_hash(same_pixels_other_file, "", "fp1")  # decoded pixels, not file bytes
    assert mm_hash(a, "", "fp1") != mm_hash(other, "", "fp1")
    assert mm_hash(a, "", "fp1") != mm_hash(a, "", "fp2")  # another model: another identity
    assert mm_hash(a, "my-id", "fp1") == "my-id"
