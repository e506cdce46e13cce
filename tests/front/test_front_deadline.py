"""A processor whose deadline passes mid-answer: a stream already answered 200 ends with OpenAI's error event
(the openai client raises it), a unary request is a 504 in OpenAI's error shape."""

from __future__ import annotations

import openai
import pytest

from tests.procs import spawn, start_encoder, start_llm, start_processor, stop_all, wait_listening, wait_serving

pytestmark = pytest.mark.e2e
BODY = {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 30000, "temperature": 0,
        "extra_body": {"ignore_eos": True}}  # 30000 tokens take far longer than the processor's 3 s deadline


@pytest.fixture(scope="module")
def client(qwen2_vl_dir):
    encoder, llm = start_encoder(qwen2_vl_dir), start_llm(qwen2_vl_dir)
    processor = start_processor(qwen2_vl_dir, wait_listening(encoder), wait_listening(llm), None,
                                "--default-timeout-s", "3")
    procs = [encoder, llm, processor]
    try:
        wait_serving(wait_listening(processor))
        front = spawn("front", "serve", "front", "--processor", processor.address, "--port", "0")
        procs.append(front)
        address = wait_listening(front, 120)
        yield openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        stop_all(*reversed(procs))


def test_a_deadline_mid_stream_is_an_error_event(client):
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(model=model, stream=True, **BODY)
    chunks = 0
    with pytest.raises(openai.APIError) as err:
        for _ in stream:
            chunks += 1
    assert chunks > 1  # the answer had begun: the status was 200
    assert err.value.body["code"].endswith("DEADLINE_EXCEEDED") and err.value.body["type"] == "server_error"


def test_a_deadline_in_a_unary_request_is_504(client):
    model = client.models.list().data[0].id
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model=model, **BODY)
    assert err.value.status_code == 504 and err.value.body["code"].endswith("DEADLINE_EXCEEDED")
