"""The OpenAI-compatible front as a process in front of the three services (each its own process),
with the official `openai` client: the same tokens as the gRPC path, usage, streaming, errors."""

from __future__ import annotations

import base64
import json
import re
import time

import grpc
import httpx
import openai
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import audio_bytes, image_bytes, video_bytes
from tests.procs import spawn, wait_listening

pytestmark = pytest.mark.e2e
MAX_TOKENS = 10
IMAGE = image_bytes(64, 48, seed=3)
VIDEO = video_bytes(seed=1)


@pytest.fixture(scope="module")
def front(qwen2_vl_services):
    proc = spawn("front", "serve", "front", "--processor", qwen2_vl_services.address, "--port", "0")
    address = wait_listening(proc, 120)
    yield address
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def client(front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{front}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# (prompt, [(modality, bytes)]): each sent both ways, the media first, as build_messages orders them.
CASES = {
    "text": ("Tell me a story about a robot.", []),
    "image": ("Describe this image.", [("image", IMAGE)]),
    "video": ("Describe this video.", [("video", VIDEO)]),
    "image-and-video": ("Compare them.", [("image", IMAGE), ("video", video_bytes(seed=3))]),
}
_PARTS = {"image": ("image_url", "image/png"), "video": ("video_url", "video/mp4")}


def openai_messages(prompt: str, media: list[tuple[str, bytes]]) -> list[dict]:
    parts = [{"type": _PARTS[kind][0], _PARTS[kind][0]: {"url": data_url(_PARTS[kind][1], data)}}
             for kind, data in media]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": prompt}]}]


def grpc_completion(address: str, prompt: str, media: list[tuple[str, bytes]]) -> processor_pb2.Completion:
    with grpc.insecure_channel(address) as channel:
        request = processor_pb2.GenerateRequest(messages=build_messages(prompt, media=media),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_TOKENS))
        return processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion


@pytest.mark.parametrize("case", list(CASES))
def test_unary_and_stream_give_the_grpc_paths_tokens(qwen2_vl_services, client, model, case):
    prompt, media = CASES[case]
    expected = grpc_completion(qwen2_vl_services.address, prompt, media)
    assert len(expected.token_ids) == MAX_TOKENS
    request = {"model": model, "messages": openai_messages(prompt, media), "max_completion_tokens": MAX_TOKENS,
               "temperature": 0, "extra_body": {"return_token_ids": True}}

    reply = client.chat.completions.create(**request)
    choice = reply.choices[0]
    assert choice.token_ids == list(expected.token_ids)  # vLLM's return_token_ids extension
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens, MAX_TOKENS)
    assert reply.usage.total_tokens == expected.prompt_tokens + MAX_TOKENS and reply.model == model

    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = [i for c in chunks if c.choices for i in (getattr(c.choices[0], "token_ids", None) or [])]
    assert (text, ids) == (expected.text, list(expected.token_ids))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert chunks[-1].usage.prompt_tokens == expected.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1


def test_media_change_the_answer(client, model):
    """The parity above has power only if the image and the video reach the model."""
    answers = set()
    for case in ("image", "video"):
        prompt, media = CASES[case]
        for variant in (media, [(kind, image_bytes(64, 48, seed=9) if kind == "image" else video_bytes(seed=2))
                                for kind, _ in media]):
            answers.add(client.chat.completions.create(model=model, messages=openai_messages(prompt, variant),
                                                       max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content)
    assert len(answers) == 4


def test_logprobs_and_stop(client, model):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and all(len(step.top_logprobs) == 3 for step in content)
    assert all(step.logprob <= 0 and step.top_logprobs[0].logprob >= step.top_logprobs[-1].logprob for step in content)
    assert content[0].token == content[0].top_logprobs[0].token  # greedy: the likeliest token
    text = reply.choices[0].message.content
    stop = text[2:4]
    stopped = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                             max_tokens=6, temperature=0, stop=stop)
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_models_and_health(front, client, model, qwen2_vl_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [str(qwen2_vl_dir)] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("gpt-nothing")
    assert err.value.body["code"] == "MODEL_NAME_UNKNOWN"
    assert httpx.get(f"http://{front}/health").json() == {"status": "ok"}
    ready = httpx.get(f"http://{front}/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def _error(err: openai.APIStatusError) -> dict:
    assert set(err.body) == {"message", "type", "param", "code"}, err.body
    return err.body


@pytest.mark.parametrize(("stream"), [False, True], ids=["unary", "stream"])
def test_errors_have_openais_shape_and_the_status_of_their_code(client, model, media_dir, stream):
    user = [{"role": "user", "content": "hi"}]
    bad_image = [{"role": "user", "content": [{"type": "image_url",
                                               "image_url": {"url": data_url("image/png", b"not an image")}}]}]
    outside = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}]}]
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": base64.b64encode(audio_bytes()).decode(), "format": "wav"}}]}]
    cases = [  # (request fields, exception class, code, param)
        ({"messages": bad_image}, openai.BadRequestError, "IMAGE_FORMAT_UNSUPPORTED", "messages[0].content[0]"),
        ({"messages": user, "temperature": -1}, openai.BadRequestError, "SAMPLING_PARAM_INVALID", "temperature"),
        ({"messages": user, "top_logprobs": 3}, openai.BadRequestError, "SAMPLING_PARAM_INVALID", "top_logprobs"),
        ({"messages": user, "model": "gpt-nothing"}, openai.NotFoundError, "MODEL_NAME_UNKNOWN", "model"),
        ({"messages": user, "n": 2}, openai.BadRequestError, "REQUEST_INVALID", "n"),
        ({"messages": outside}, openai.PermissionDeniedError, "MEDIA_PATH_NOT_ALLOWED", "messages[0].content[0]"),
        ({"messages": audio}, openai.BadRequestError, "MODALITY_UNSUPPORTED", "messages[0].content[0]"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, openai.BadRequestError, "ROLE_INVALID", "messages[0]"),
    ]
    for fields, error_class, code, param in cases:
        with pytest.raises(error_class) as err:
            client.chat.completions.create(**{"model": model, "max_tokens": 4, "stream": stream, **fields})
        body = _error(err.value)
        assert (body["code"], body["param"]) == (code, param), body
        assert body["type"] == ("permission_error" if error_class is openai.PermissionDeniedError
                                else "invalid_request_error")
    # and the server still answers
    assert client.chat.completions.create(model=model, messages=user, max_tokens=2).usage.completion_tokens == 2


def test_file_urls_inside_the_allowed_dir_are_read_by_the_processor(client, model, media_dir):
    (media_dir / "front.png").write_bytes(IMAGE)

    def answer(url: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Describe this image."}]}]
        return client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS,
                                              temperature=0).choices[0].message.content

    assert answer(f"file://{media_dir / 'front.png'}") == answer(data_url("image/png", IMAGE))


def test_bodies_the_front_cannot_read(front, model):
    url = f"http://{front}/v1/chat/completions"
    cases = [  # (body, param)
        (b"{not json", None),
        (json.dumps({"model": model, "messages": "hi"}).encode(), "messages"),
        (json.dumps({"model": model, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}).encode(),
         "messages.0.content.list[...].0"),
        (json.dumps({"model": model, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}).encode(),
         "messages[0].content[0].image_url.url"),
    ]
    for body, param in cases:
        reply = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert error["code"] == "REQUEST_INVALID" and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] is not None and error["param"].startswith(param.split(".list")[0]), error
    assert httpx.get(f"http://{front}/v1/nothing").json()["error"]["message"] == "Not Found"


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_client_disconnect_cancels_the_processor_call(front, qwen2_vl_services, model, stream):
    """A long request, dropped (after the first chunk of a stream; at a 2 s client timeout when unary): the
    processor's call and the LLM's end within seconds (30000 tokens would take more than 30 s), both logged with
    the request id the client sent."""
    request_id = f"front-disconnect-{'stream' if stream else 'unary'}-{time.time_ns()}"
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me everything."}], "stream": stream,
            "max_tokens": 30000, "ignore_eos": True, "temperature": 0}
    headers = {"x-request-id": request_id}
    if stream:
        with httpx.stream("POST", f"http://{front}/v1/chat/completions", json=body, headers=headers,
                          timeout=60) as reply:
            assert reply.status_code == 200 and reply.headers["x-request-id"] == request_id
            next(reply.iter_lines())
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"http://{front}/v1/chat/completions", json=body, headers=headers, timeout=2)
    method = "/StreamGenerate" if stream else "/Generate"
    deadline = time.monotonic() + 30

    def call_ms(proc, method: str) -> float | None:
        """How long the call the request id names lasted, as the service's log line says."""
        for line in proc.lines:
            found = re.search(rf"\[{request_id}\] \S+{method} \w+ ([\d.]+) ms", line)
            if found:
                return float(found.group(1))
        return None

    while time.monotonic() < deadline and None in (call_ms(qwen2_vl_services.processor, method),
                                                   call_ms(qwen2_vl_services.llm, "/StreamGenerate")):
        time.sleep(0.2)
    # 30000 tokens take more than 30 s here (~1-2 ms each); a cancelled call ends within seconds.
    assert (call_ms(qwen2_vl_services.processor, method) or 1e9) < 10_000, qwen2_vl_services.processor.output()
    assert (call_ms(qwen2_vl_services.llm, "/StreamGenerate") or 1e9) < 10_000, qwen2_vl_services.llm.output()
