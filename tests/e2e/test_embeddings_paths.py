"""Two ways around the encoder service, with the services as separate processes:

- precomputed embeddings: a client sends an image's embeddings (computed by transformers' own tower)
  instead of the image; the answer is the image's, and the encoder never hears of the request;
- a processor started with --local-encode-max-patches encodes small images itself and sends the
  rest to the encoder service.

The encoder's log (one line per call, with the request id the processor passes on) tells which
requests reached it.
"""

from __future__ import annotations

import io
import time

import grpc
import pytest
from PIL import Image

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.interceptors import REQUEST_ID_KEY
from services.common.tensors import to_proto
from tests.media import image_bytes
from tests.procs import Proc, start_processor, wait_listening, wait_serving
from tests.reference import hf_generate, hf_image_embeddings

pytestmark = pytest.mark.e2e

MAX_NEW_TOKENS = 8
PROMPT = "Describe this image."
SMALL = image_bytes(160, 120, seed=41)  # tiny Qwen2-VL: 96 patches
LARGE = image_bytes(700, 300, seed=42, kind="gradient")  # 240 patches


def _generate(address: str, messages, request_id: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        request = processor_pb2.GenerateRequest(messages=messages, sampling=generation_pb2.SamplingParams(
            max_new_tokens=MAX_NEW_TOKENS))
        reply = processor_pb2_grpc.ProcessorServiceStub(channel).Generate(
            request, timeout=300, metadata=((REQUEST_ID_KEY, request_id),))
        return list(reply.completion.token_ids)


def _encode_calls(encoder: Proc, request_id: str, settle_s: float = 2.0) -> int:
    """The encoder's calls for the request (the processor calls StreamEncode), once its log has caught up."""
    def count() -> int:
        return sum(f"[{request_id}]" in line and "EncoderService/StreamEncode" in line for line in list(encoder.lines))

    deadline = time.monotonic() + settle_s
    while not count() and time.monotonic() < deadline:
        time.sleep(0.05)
    return count()


def test_precomputed_embeddings_skip_the_encoder(qwen2_vl_services, qwen2_vl_dir):
    expected = hf_generate(qwen2_vl_dir, PROMPT, [SMALL], MAX_NEW_TOKENS)
    ref = hf_image_embeddings(qwen2_vl_dir, PROMPT, [SMALL])
    width, height = Image.open(io.BytesIO(SMALL)).size
    media = processor_pb2.Media(embeddings=processor_pb2.MediaEmbeddings(
        embeddings=to_proto(ref.embeddings[0]), width_px=width, height_px=height))
    messages = [processor_pb2.ChatMessage(role="user", content=[
        processor_pb2.ContentPart(image=media), processor_pb2.ContentPart(text=PROMPT)])]
    assert _generate(qwen2_vl_services.address, messages, "embeds-precomputed") == expected
    assert _generate(qwen2_vl_services.address, build_messages(PROMPT, [SMALL]), "embeds-image") == expected
    assert _encode_calls(qwen2_vl_services.encoder, "embeds-image") == 1  # the log shows calls when there are
    assert _encode_calls(qwen2_vl_services.encoder, "embeds-precomputed") == 0


@pytest.fixture(scope="module")
def local_processor(qwen2_vl_services, qwen2_vl_dir):
    """A second processor, encoding items of at most 128 patches itself, beside the shared encoder and LLM."""
    proc = start_processor(qwen2_vl_dir, qwen2_vl_services.encoder.address, qwen2_vl_services.llm.address, None,
                           "--local-encode-max-patches", "128")
    wait_serving(wait_listening(proc))
    yield proc
    proc.stop()


def test_local_encoder_takes_small_images(qwen2_vl_services, qwen2_vl_dir, local_processor):
    assert "local encoder: items of at most 128 patches" in "".join(local_processor.lines)
    for name, images, encoder_calls in (("small", [SMALL], 0), ("large", [LARGE], 1), ("both", [SMALL, LARGE], 1)):
        expected = hf_generate(qwen2_vl_dir, PROMPT, images, MAX_NEW_TOKENS)
        request_id = f"embeds-local-{name}"
        assert _generate(local_processor.address, build_messages(PROMPT, images), request_id) == expected, name
        assert _encode_calls(qwen2_vl_services.encoder, request_id) == encoder_calls, name
