"""Precomputed embeddings straight to LlmService (in process, port 0): a client that ran the model's
tower itself gets transformers' tokens, and every way its tensors can disagree with the model is
INVALID_ARGUMENT naming the problem (hidden size, dtype, rows, deepstack count and shape).

The embeddings come from transformers' own tower (tests/reference.py), not from Triptych's encoder.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoConfig

from services.common.api.triptych.common.v1 import generation_pb2, tensor_pb2
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import LlmConfig, ServerConfig
from services.common.errors import error_info
from services.common.tensors import to_named, to_proto
from services.llm.server import start_server
from services.llm.servicer import LlmServicer
from services.models.checkpoint import Checkpoint
from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.media import image_bytes
from tests.reference import HfImageEmbeddings, hf_generate, hf_image_embeddings

MAX_NEW_TOKENS = 10
ONE = ("Describe this image.", [image_bytes(160, 120, seed=1)])
TWO = ("Compare the two pictures.", [image_bytes(96, 96, seed=5), image_bytes(128, 64, seed=6, kind="gradient")])


@pytest.fixture(scope="module")
def qwen3_boosted(tmp_path_factory) -> Path:
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x30", 30.0)


def _model_dir(name: str, request) -> Path:
    return request.getfixturevalue("qwen3_boosted") if name == "qwen3_vl-x30" else tiny_checkpoint(name)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl-x30", "llava"])
def served(request):
    """(model folder, an LLM servicer on it): one engine process per family."""
    model_dir = _model_dir(request.param, request)
    servicer = LlmServicer(Checkpoint(model_dir), LlmConfig(model=model_dir))
    yield model_dir, servicer
    servicer.stop()


def _image_token_id(model_dir: Path) -> int:
    config = AutoConfig.from_pretrained(model_dir)
    token_id = getattr(config, "image_token_id", None)
    return token_id if token_id is not None else config.image_token_index  # LLaVA's name


def _runs(ids: list[int], token_id: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of `token_id`: one per image in these prompts."""
    runs: list[tuple[int, int]] = []
    for i, tok in enumerate(ids):
        if tok == token_id:
            if runs and runs[-1][0] + runs[-1][1] == i:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((i, 1))
    return runs


def _request(model_dir: Path, ref: HfImageEmbeddings) -> llm_pb2.GenerateRequest:
    """What a router that ran the tower itself sends: the prompt's ids, each image's rows at its run."""
    runs = _runs(ref.input_ids, _image_token_id(model_dir))
    assert [n for _, n in runs] == [len(e) for e in ref.embeddings]
    inputs = [llm_pb2.MultimodalInput(
        placeholder=tensor_pb2.PlaceholderRange(modality=tensor_pb2.MODALITY_IMAGE, offset=offset, length=length),
        embeddings=to_proto(rows), deepstack_embeddings=[to_proto(d) for d in deepstack],
        position_inputs=to_named(positions))
        for (offset, length), rows, deepstack, positions in zip(runs, ref.embeddings, ref.deepstack,
                                                                ref.position_inputs, strict=True)]
    return llm_pb2.GenerateRequest(prompt=llm_pb2.Prompt(token_ids=ref.input_ids, multimodal_inputs=inputs),
                                   sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS))


def _call(servicer, request: llm_pb2.GenerateRequest) -> llm_pb2.GenerateResponse | grpc.aio.AioRpcError:
    async def body():
        server, _ = await start_server(servicer, ServerConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                try:
                    return await llm_pb2_grpc.LlmServiceStub(channel).Generate(request, timeout=120)
                except grpc.aio.AioRpcError as err:
                    return err
        finally:
            await server.stop(0)

    return asyncio.run(body())


@pytest.mark.parametrize("case", [ONE, TWO], ids=["one-image", "two-images"])
def test_tower_embeddings_give_transformers_tokens(served, case):
    model_dir, servicer = served
    prompt, images = case
    ref = hf_image_embeddings(model_dir, prompt, images)
    expected = hf_generate(model_dir, prompt, images, MAX_NEW_TOKENS)
    reply = _call(servicer, _request(model_dir, ref))
    assert list(reply.token_ids) == expected
    assert reply.prompt_tokens == len(ref.input_ids)
    if any(ref.deepstack):  # Qwen3-VL: the deepstack rows are used, not just accepted
        zeroed = [[torch.zeros_like(d) for d in layers] for layers in ref.deepstack]
        without = HfImageEmbeddings(ref.input_ids, ref.embeddings, zeroed, ref.position_inputs)
        assert list(_call(servicer, _request(model_dir, without)).token_ids) != expected


# ---- what the LLM refuses: (mutation of the first input, reason, text the message holds) ----------
def _wider(mm):
    rows = torch.zeros(mm.placeholder.length, mm.embeddings.shape[1] + 1)
    mm.embeddings.CopyFrom(to_proto(rows))


def _bfloat16(mm):
    mm.embeddings.CopyFrom(to_proto(torch.zeros(mm.placeholder.length, mm.embeddings.shape[1], dtype=torch.bfloat16)))


def _one_row_short(mm):
    mm.embeddings.CopyFrom(to_proto(torch.zeros(mm.placeholder.length - 1, mm.embeddings.shape[1])))


def _unset(mm):
    mm.ClearField("embeddings")


def _nan(mm):
    rows = torch.zeros(mm.placeholder.length, mm.embeddings.shape[1])
    rows[2, 5] = float("nan")
    mm.embeddings.CopyFrom(to_proto(rows))


def _drop_deepstack(mm):
    del mm.deepstack_embeddings[-1]


def _add_deepstack(mm):
    mm.deepstack_embeddings.append(mm.embeddings)


def _inf_deepstack(mm):
    rows = torch.zeros(mm.placeholder.length, mm.embeddings.shape[1])
    rows[1, 3] = -float("inf")
    mm.deepstack_embeddings[1].CopyFrom(to_proto(rows))


def _short_deepstack(mm):
    mm.deepstack_embeddings[0].CopyFrom(to_proto(torch.zeros(mm.placeholder.length - 1, mm.embeddings.shape[1])))


COMMON = [
    (_wider, "EMBEDDING_SHAPE_MISMATCH", "placeholder length x hidden size"),
    (_bfloat16, "EMBEDDING_DTYPE_MISMATCH", "DATA_TYPE_BFLOAT16"),
    (_one_row_short, "EMBEDDING_SHAPE_MISMATCH", "placeholder length x hidden size"),
    (_unset, "EMBEDDING_SHAPE_MISMATCH", "embeddings is unset"),
    (_nan, "EMBEDDING_NOT_FINITE", "first at row 2, column 5"),
]
# Deepstack: Qwen3-VL takes one tensor per layer, every other family none (never silently ignored).
DEEPSTACK = {
    "qwen2_vl": [(_add_deepstack, "DEEPSTACK_COUNT_MISMATCH", "takes 0 (one per deepstack layer)")],
    "llava": [(_add_deepstack, "DEEPSTACK_COUNT_MISMATCH", "takes 0 (one per deepstack layer)")],
    "qwen3_vl-x30": [(_drop_deepstack, "DEEPSTACK_COUNT_MISMATCH", "has 1 deepstack_embeddings"),
                     (_add_deepstack, "DEEPSTACK_COUNT_MISMATCH", "has 3 deepstack_embeddings"),
                     (_short_deepstack, "EMBEDDING_SHAPE_MISMATCH", "deepstack_embeddings[0] of shape"),
                     (_inf_deepstack, "EMBEDDING_NOT_FINITE", "deepstack_embeddings[1] holds NaN or Inf (first")],
}


def test_mismatched_embeddings_are_invalid_argument(served, request):
    model_dir, servicer = served
    name = request.node.callspec.params["served"]
    good = _request(model_dir, hf_image_embeddings(model_dir, *ONE))
    for mutate, reason, text in COMMON + DEEPSTACK[name]:
        bad = llm_pb2.GenerateRequest()
        bad.CopyFrom(good)
        mutate(bad.prompt.multimodal_inputs[0])
        err = _call(servicer, bad)
        assert isinstance(err, grpc.aio.AioRpcError), (mutate.__name__, err)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (mutate.__name__, err.details())
        assert error_info(err).reason == reason, (mutate.__name__, err.details())
        assert err.details().startswith("multimodal_inputs[0]") and text in err.details(), (mutate.__name__,
                                                                                           err.details())
    assert _call(servicer, good).token_ids  # still serving
