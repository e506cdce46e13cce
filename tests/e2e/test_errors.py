"""Bad input gets a clear status within the deadline, and the services go on serving."""

from __future__ import annotations

import grpc
import pytest

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import image_bytes

pytestmark = pytest.mark.e2e

GOOD_IMAGE = image_bytes(64, 64, seed=11)


@pytest.fixture(scope="module")
def stub(qwen2_vl_services):
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def _generate(stub, parts, sampling=None, timeout=30):
    request = processor_pb2.GenerateRequest(
        messages=[processor_pb2.ChatMessage(role="user", content=parts)],
        sampling=sampling or generation_pb2.SamplingParams(max_new_tokens=4))
    return stub.Generate(request, timeout=timeout)


def _image_part(**media) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(image=processor_pb2.Media(**media))


def _text(text: str) -> processor_pb2.ContentPart:
    return processor_pb2.ContentPart(text=text)


def _expect(stub, code, reason, parts, sampling=None):
    with pytest.raises(grpc.RpcError) as caught:
        _generate(stub, parts, sampling)
    err = caught.value
    assert err.code() == code, err.details()
    assert error_info(err).reason == reason, err.details()
    # ...and the processor still serves the next request, image included.
    assert _generate(stub, [_image_part(data=GOOD_IMAGE), _text("ok?")]).completion.completion_tokens > 0
    return err


def test_truncated_image(stub):
    err = _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_DECODE_FAILED",
                  [_image_part(data=GOOD_IMAGE[: len(GOOD_IMAGE) // 2]), _text("hi")])
    assert "content[0]" in err.details()


def test_corrupt_image_data(stub):
    corrupt = GOOD_IMAGE[:60] + bytes(200) + GOOD_IMAGE[260:]
    _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_DECODE_FAILED", [_image_part(data=corrupt), _text("hi")])


def test_not_an_image(stub):
    _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_FORMAT_UNSUPPORTED",
            [_image_part(data=b"%PDF-1.4 this is not an image"), _text("hi")])


def test_unsupported_image_format(stub):
    _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "IMAGE_FORMAT_UNSUPPORTED",
            [_image_part(data=image_bytes(32, 32, fmt="PPM")), _text("hi")])


def test_missing_file(stub, media_dir):
    err = _expect(stub, grpc.StatusCode.NOT_FOUND, "MEDIA_FILE_NOT_FOUND",
                  [_image_part(url=f"file://{media_dir}/nope.png"), _text("hi")])
    assert "nope.png" in err.details()
    assert error_info(err).domain == "triptych.processor"


def test_file_outside_allowed_dirs(stub, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(GOOD_IMAGE)
    _expect(stub, grpc.StatusCode.PERMISSION_DENIED, "MEDIA_PATH_NOT_ALLOWED",
            [_image_part(url=f"file://{outside}"), _text("hi")])


def test_symlink_out_of_allowed_dir(stub, media_dir, tmp_path):
    target = tmp_path / "secret.png"
    target.write_bytes(GOOD_IMAGE)
    (media_dir / "link.png").symlink_to(target)
    _expect(stub, grpc.StatusCode.PERMISSION_DENIED, "MEDIA_PATH_NOT_ALLOWED",
            [_image_part(url=f"file://{media_dir}/link.png"), _text("hi")])


def test_http_url_is_refused_clearly(stub):
    _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "MEDIA_URL_SCHEME_UNSUPPORTED",
            [_image_part(url="https://example.com/cat.png"), _text("hi")])


def test_allowed_file_gives_same_tokens_as_inline_bytes(stub, media_dir):
    (media_dir / "good.png").write_bytes(GOOD_IMAGE)
    by_url = _generate(stub, [_image_part(url=f"file://{media_dir}/good.png"), _text("describe")])
    inline = _generate(stub, [_image_part(data=GOOD_IMAGE), _text("describe")])
    assert list(by_url.completion.token_ids) == list(inline.completion.token_ids)


def test_prompt_longer_than_context(stub, qwen2_vl_dir):
    import json

    max_ctx = json.loads((qwen2_vl_dir / "config.json").read_text())["text_config"]["max_position_embeddings"]
    err = _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "PROMPT_TOO_LONG", [_text("word " * (max_ctx + 10))])
    assert str(max_ctx) in err.details()


def test_reserved_token_in_text(stub):
    _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "RESERVED_TOKEN_IN_TEXT", [_text("look <|image_pad|> here")])


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 1.5),
                                         ("top_k", -3), ("max_new_tokens", -5), ("repetition_penalty", 0.0)])
def test_out_of_range_sampling(stub, field, value):
    sampling = generation_pb2.SamplingParams(max_new_tokens=4)
    setattr(sampling, field, value)
    err = _expect(stub, grpc.StatusCode.INVALID_ARGUMENT, "SAMPLING_PARAM_INVALID", [_text("hi")], sampling)
    assert field in err.details()


def test_empty_messages(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(processor_pb2.GenerateRequest(), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bad_role(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(processor_pb2.GenerateRequest(messages=[processor_pb2.ChatMessage(role="robot", content=[_text("x")])]),
                      timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "robot" in caught.value.details()


def test_deadline_is_honoured(stub):
    with pytest.raises(grpc.RpcError) as caught:
        _generate(stub, [_text("Write a long story.")],
                  generation_pb2.SamplingParams(max_new_tokens=100_000, ignore_eos=True), timeout=1.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _generate(stub, [_text("still there?")]).completion.completion_tokens > 0


def test_sampling_with_seed_is_reproducible(stub):
    sampling = generation_pb2.SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    first = _generate(stub, [_image_part(data=GOOD_IMAGE), _text("a")], sampling)
    second = _generate(stub, [_image_part(data=GOOD_IMAGE), _text("a")], sampling)
    assert list(first.completion.token_ids) == list(second.completion.token_ids)
