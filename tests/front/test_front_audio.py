"""`input_audio` (and `audio_url` data URLs) through the front give the gRPC path's tokens (Qwen2-Audio tiny,
the services and the front as separate processes), and the clip changes the answer."""

from __future__ import annotations

import base64

import grpc
import openai
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import audio_bytes
from tests.parity import family_services
from tests.procs import spawn, wait_listening

pytestmark = pytest.mark.e2e
MAX_TOKENS = 8
PROMPT = "What do you hear?"

services = family_services("qwen2_audio")


@pytest.fixture(scope="module")
def client(services):
    proc = spawn("front", "serve", "front", "--processor", services.address, "--port", "0")
    address = wait_listening(proc, 120)
    yield openai.OpenAI(base_url=f"http://{address}/v1", api_key="unused", max_retries=0, timeout=300)
    assert proc.stop() == 0, proc.output()


def grpc_tokens(address: str, clip: bytes) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        request = processor_pb2.GenerateRequest(messages=build_messages(PROMPT, media=[("audio", clip)]),
                                                sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_TOKENS))
        return list(processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=300).completion.token_ids)


@pytest.mark.parametrize("part", ["input_audio", "audio_url"])
def test_audio_parts_give_the_grpc_paths_tokens(services, client, part):
    answers = []
    for clip in (audio_bytes(seed=1), audio_bytes(seconds=2.5, seed=2)):
        data = base64.b64encode(clip).decode()
        media = ({"type": "input_audio", "input_audio": {"data": data, "format": "wav"}} if part == "input_audio"
                 else {"type": "audio_url", "audio_url": {"url": f"data:audio/wav;base64,{data}"}})
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": [media, {"type": "text", "text": PROMPT}]}],
            max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
        assert reply.choices[0].token_ids == grpc_tokens(services.address, clip)
        answers.append(reply.choices[0].token_ids)
    assert answers[0] != answers[1]  # the clip reaches the model
