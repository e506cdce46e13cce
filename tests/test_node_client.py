"""clients/node: the Node.js example client (grpc-js + proto-loader on protos/ as they are) against the
three services as processes, token for token the same as the Python client."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.media import image_bytes

ROOT = Path(__file__).resolve().parent.parent
CLIENT = ROOT / "clients" / "node"
PROMPT = "Describe the image."
MAX_NEW_TOKENS = 8


@pytest.fixture(scope="session")
def node() -> str:
    """`node`, with clients/node's dependencies installed by `npm ci` (package-lock.json) once per session."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        # Node.js is part of the test machines' setup: a skip would hide a missing install.
        pytest.fail(f"Node.js not on PATH (node: {node}, npm: {npm}); install Node.js >= 18 with npm")
    result = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], check=False,
                            cwd=CLIENT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"npm ci in {CLIENT} failed:\n{result.stdout}{result.stderr}"
    return node


def run_client(node: str, address: str, image: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([node, str(CLIENT / "generate.js"), "--server", address, "--image", str(image),
                             "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW_TOKENS)],
                            check=False, capture_output=True, timeout=60)
    # Decoded by hand: text=True would turn a "\r" the model generates into "\n".
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def test_node_client_streams_the_python_clients_tokens(node, qwen2_vl_services, tmp_path):
    image = image_bytes(64, 48, seed=7)
    (tmp_path / "image.png").write_bytes(image)
    result = run_client(node, qwen2_vl_services.address, tmp_path / "image.png")
    assert result.returncode == 0, result.stderr
    text, _, last = result.stdout.rstrip("\n").rpartition("\n")  # the deltas, "\n", the JSON line
    got = json.loads(last)

    request = processor_pb2.GenerateRequest(messages=build_messages(PROMPT, [image]),
                                            sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        expected = processor_pb2_grpc.ProcessorServiceStub(channel).Generate(request, timeout=60).completion

    assert got["token_ids"] == list(expected.token_ids)
    assert (got["prompt_tokens"], got["completion_tokens"]) == (expected.prompt_tokens, expected.completion_tokens)
    assert got["finish_reason"] == {generation_pb2.FINISH_REASON_STOP: "stop",
                                    generation_pb2.FINISH_REASON_LENGTH: "length"}[expected.finish_reason]
    assert text == expected.text  # the streamed deltas join to the completion's text


def test_node_client_prints_one_error_line_for_a_bad_image(node, qwen2_vl_services, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    result = run_client(node, qwen2_vl_services.address, tmp_path / "bad.png")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: INVALID_ARGUMENT [IMAGE_FORMAT_UNSUPPORTED]: "), lines[0]
    assert result.stdout == ""
