"""Logprobs through the three services (separate processes): per generated token, its logprob and the
top-n alternatives equal transformers' own raw logits (`generate(output_logits=True)`) after
log_softmax, within 1e-4; the processor adds each token's text; `triptych generate --logprobs`
prints them."""

from __future__ import annotations

import json
import subprocess
import sys

import grpc
import pytest
import torch
from transformers import AutoTokenizer

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.media import image_bytes
from tests.reference import _inputs

MAX_NEW_TOKENS = 6
TOP_N = 5
CASES = {
    "text-only": ("Tell me a story about the sea.", []),
    "one-image": ("Describe this image.", [image_bytes(96, 128, seed=7)]),
}


def hf_top_logprobs(model_dir, prompt: str, images: list[bytes]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Greedy tokens, and per step the top-N (ids, logprobs) of log_softmax(raw logits), from transformers."""
    model, inputs = _inputs(model_dir, prompt, images, "AutoModelForImageTextToText")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), -1)  # [steps, vocab]
    values, ids = logprobs.topk(TOP_N, -1)
    return out.sequences[0, inputs["input_ids"].shape[1]:].tolist(), ids, values


@pytest.fixture(scope="module")
def stub(qwen2_vl_services):
    with grpc.insecure_channel(qwen2_vl_services.address) as channel:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)


def _sampling() -> generation_pb2.SamplingParams:
    return generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS, logprobs=True, top_logprobs=TOP_N)


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(CASES))
def test_logprobs_match_transformers_raw_logits(stub, qwen2_vl_dir, case):
    prompt, images = CASES[case]
    tokens, hf_ids, hf_values = hf_top_logprobs(qwen2_vl_dir, prompt, images)
    completion = stub.Generate(processor_pb2.GenerateRequest(messages=build_messages(prompt, images),
                                                             sampling=_sampling()), timeout=120).completion
    assert list(completion.token_ids) == tokens
    assert len(completion.logprobs) == len(tokens)
    tokenizer = AutoTokenizer.from_pretrained(qwen2_vl_dir)
    for step, (token, step_ids, step_values) in enumerate(zip(tokens, hf_ids, hf_values, strict=False)):
        got = completion.logprobs[step]
        top_ids = [t.token_id for t in got.top_logprobs]
        top_values = torch.tensor([t.logprob for t in got.top_logprobs])
        assert top_ids == step_ids.tolist(), f"step {step}"
        assert torch.allclose(top_values, step_values, atol=1e-4), f"step {step}: {top_values} vs {step_values}"
        assert got.token.token_id == token
        assert got.token.logprob == max(t.logprob for t in got.top_logprobs)  # greedy: the most likely
        assert [t.text for t in (got.token, *got.top_logprobs)] == [
            tokenizer.decode([t.token_id]) for t in (got.token, *got.top_logprobs)]


@pytest.mark.e2e
def test_streamed_logprobs_are_the_unary_ones(stub):
    messages = build_messages(*CASES["one-image"])
    unary = stub.Generate(processor_pb2.GenerateRequest(messages=messages, sampling=_sampling()), timeout=120)
    events = list(stub.StreamGenerate(processor_pb2.StreamGenerateRequest(messages=messages, sampling=_sampling()),
                                      timeout=120))
    streamed = [step for e in events[:-1] for step in e.logprobs]
    assert all(len(e.logprobs) == len(e.token_ids) for e in events[:-1])
    assert streamed == list(events[-1].completion.logprobs) == list(unary.completion.logprobs)
    plain = stub.Generate(processor_pb2.GenerateRequest(
        messages=messages, sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=120)
    assert not plain.completion.logprobs and plain.completion.token_ids == unary.completion.token_ids


@pytest.mark.e2e
def test_cli_prints_logprobs_as_json(qwen2_vl_services):
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "generate", "--server", qwen2_vl_services.address, "--prompt",
         "Hi there", "--max-new-tokens", "3", "--logprobs", "2", "--min-p", "0.1", "--presence-penalty", "0.5",
         "--frequency-penalty", "0.2", "--json"],
        check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert len(answer["logprobs"]) == len(answer["token_ids"]) > 0
    first = answer["logprobs"][0]
    assert first["token_id"] == answer["token_ids"][0] and first["logprob"] <= 0
    assert len(first["top_logprobs"]) == 2 and isinstance(first["top_logprobs"][0]["text"], str)


@pytest.mark.e2e
def test_invalid_sampling_value_reaches_the_client_naming_the_field(stub):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(processor_pb2.GenerateRequest(messages=build_messages("hi", [image_bytes(64, 64, seed=1)]),
                                                    sampling=generation_pb2.SamplingParams(min_p=2.0)), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(caught.value)
    assert (info.reason, info.metadata["field"]) == ("SAMPLING_PARAM_INVALID", "sampling.min_p")
    assert info.domain == "triptych.processor"  # refused before any media work, not relayed from the LLM
    assert "sampling.min_p" in caught.value.details()
