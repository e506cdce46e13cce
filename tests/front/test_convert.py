"""The front's mapping of OpenAI's request onto the processor's, and of gRPC statuses onto HTTP ones."""

from __future__ import annotations

import base64

import grpc
import pytest
from pydantic import ValidationError

from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.errors import TriptychError
from services.front import convert
from services.front.errors import HTTP_STATUS, from_domain
from services.front.schema import ChatCompletionRequest


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 **fields})


def test_openai_defaults_and_names():
    s = convert.sampling_params(request())
    assert (s.temperature, s.top_p, s.max_new_tokens, s.top_k, s.logprobs) == (1.0, 1.0, 0, 0, False)
    assert not s.HasField("seed") and not s.HasField("repetition_penalty")
    s = convert.sampling_params(request(max_tokens=5, max_completion_tokens=7, temperature=0, top_k=-1, seed=3,
                                        stop="END", logprobs=True, top_logprobs=2, ignore_eos=True,
                                        repetition_penalty=1.1, stop_token_ids=[9], min_p=0.1))
    assert (s.max_new_tokens, s.temperature, s.top_k, s.seed, list(s.stop)) == (7, 0.0, 0, 3, ["END"])
    assert (s.logprobs, s.top_logprobs, s.ignore_eos, list(s.stop_token_ids)) == (True, 2, True, [9])
    assert s.repetition_penalty == pytest.approx(1.1) and s.min_p == pytest.approx(0.1)
    assert list(convert.sampling_params(request(stop=["a", "b"])).stop) == ["a", "b"]


def test_parts_map_one_to_one_in_order():
    png = base64.b64encode(b"PNG bytes").decode()
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}, "uuid": "img-1"},
            {"type": "video_url", "video_url": {"url": "file:///media/clip.mp4"}},
            {"type": "input_audio", "input_audio": {"data": png, "format": "wav"}},
            {"type": "audio_url", "audio_url": {"url": "file:///media/a.wav"}}]},
    ]
    out = convert.chat_messages(request(messages=messages).messages)
    assert [m.role for m in out] == ["system", "user"]  # OpenAI's developer role is the system's
    parts = out[1].content
    assert [p.WhichOneof("part") for p in parts] == ["text", "image", "video", "audio", "audio"]
    assert parts[1].image == processor_pb2.Media(data=b"PNG bytes", uuid="img-1")
    assert parts[2].video.url == "file:///media/clip.mp4" and parts[4].audio.url == "file:///media/a.wav"
    assert parts[3].audio.data == b"PNG bytes"


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": 2}, "n"), ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"seed": -1}, "seed"), ({"max_tokens": 2**40}, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}]}]},
     "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:;base64,@@"}}]}]},
     "messages[0].content[0].image_url.url"),
])
def test_what_the_front_refuses_names_the_param(fields, param):
    with pytest.raises(TriptychError) as err:
        convert.generate_request(request(**fields))
    failure = from_domain(err.value)
    assert (failure.status, failure.code, failure.param) == (400, "REQUEST_INVALID", param)


def test_accepted_no_ops():
    convert.generate_request(request(n=1, tools=[], tool_choice="none", logit_bias={},
                                     response_format={"type": "text"}))


def test_unknown_part_types_and_wrong_types_are_validation_errors():
    with pytest.raises(ValidationError):
        request(messages=[{"role": "user", "content": [{"type": "hologram"}]}])
    with pytest.raises(ValidationError):
        request(temperature="hot")


def test_http_status_of_each_grpc_code():
    assert {code: HTTP_STATUS[code] for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                                                 grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAUTHENTICATED,
                                                 grpc.StatusCode.PERMISSION_DENIED)} == {
        grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
        grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.PERMISSION_DENIED: 403}
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}


def _rpc_error(code: grpc.StatusCode, details: str, error: TriptychError | None = None) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata(*error.to_status("triptych.processor").trailing_metadata) if error else None
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing or grpc.aio.Metadata(), details)


def test_processor_failures_keep_their_reason_and_transport_failures_get_the_fronts():
    from services.common.errors import InvalidArgument, ResourceExhausted
    from services.common.sampling_params import invalid_param
    from services.front.errors import from_rpc

    sampling = invalid_param("max_new_tokens", "must be >= 0, got -1")
    failure = from_rpc(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, sampling.message, sampling), "p:1")
    assert (failure.status, failure.code, failure.param) == (400, "SAMPLING_PARAM_INVALID", "max_completion_tokens")
    bad_image = InvalidArgument("messages[1].content[2].image: truncated", reason="IMAGE_DECODE_FAILED")
    failure = from_rpc(_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, bad_image.message, bad_image), "p:1")
    assert (failure.code, failure.param) == ("IMAGE_DECODE_FAILED", "messages[1].content[2]")
    full = ResourceExhausted("the LLM queue is full", reason="LLM_QUEUE_FULL", retry_delay_s=2.5)
    failure = from_rpc(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, full.message, full), "p:1")
    response = failure.response()
    assert (response.status_code, response.headers["retry-after"]) == (429, "2")

    down = from_rpc(_rpc_error(grpc.StatusCode.UNAVAILABLE, "connection refused"), "p:1")
    assert (down.status, down.code, down.retry_after_s) == (503, "PROCESSOR_UNAVAILABLE", 1.0) and "p:1" in down.message
    slow = from_rpc(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), "p:1")
    assert (slow.status, slow.code) == (504, "PROCESSOR_DEADLINE_EXCEEDED")
    big = from_rpc(_rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Sent message larger than max"), "p:1")
    assert (big.status, big.code) == (413, "PROCESSOR_CALL_FAILED")
    odd = from_rpc(_rpc_error(grpc.StatusCode.UNIMPLEMENTED, "no such method"), "p:1")
    assert (odd.status, odd.code) == (501, "PROCESSOR_CALL_FAILED")
