"""EVS through the three services as separate processes (Qwen2-VL, processor started with
--video-pruning-rate 0.5): the prompt shrinks by the expected count, the encoder returns the kept rows
and their indexes, and the tokens equal an independent reference: transformers' whole model fed the
unpruned prompt's embeddings with the dropped video tokens left out, at the positions transformers'
own get_rope_index gives the unpruned prompt. A request's rate 0 is token-exact with plain
transformers; a bad rate is a clear INVALID_ARGUMENT and the services keep serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from services.common.errors import error_info
from tests.checkpoints import tiny_checkpoint
from tests.media import video_bytes
from tests.procs import ServiceSet, start_encoder, start_llm, start_processor, wait_listening, wait_serving
from tests.reference import OtherMedia, _inputs, hf_generate, hf_prompt_tokens

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "What happens in this video?"
MAX_NEW_TOKENS = 10
CLIP = video_bytes(seconds=4, seed=1)  # 8 frames at 2 fps: 4 frame groups of 6 merged tokens
SERVER_RATE = 0.5


@pytest.fixture(scope="module")
def services():
    model = tiny_checkpoint("qwen2_vl")
    encoder, llm = start_encoder(model), start_llm(model)
    processor = start_processor(model, wait_listening(encoder), wait_listening(llm), None,
                                "--video-pruning-rate", str(SERVER_RATE))
    wait_listening(processor)
    started = ServiceSet(encoder, llm, processor)
    for proc in (encoder, llm, processor):
        wait_serving(proc.address)
    yield started
    started.stop()


def _request(rate: float | None = None, clip: bytes = CLIP) -> list[processor_pb2.ChatMessage]:
    messages = build_messages(PROMPT, media=[("video", clip)])
    if rate is not None:
        messages[0].content[0].video.video_options.pruning_rate = rate
    return messages


def _generate(services, messages) -> processor_pb2.Completion:
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        return stub.Generate(processor_pb2.GenerateRequest(
            messages=messages, sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=300).completion


def _vllm_style_mask(rows: torch.Tensor, frames: int, rate: float) -> torch.Tensor:
    """The tokens vLLM's EVS keeps, written here from its description: a bool mask over the unpruned rows."""
    grid = rows.float().reshape(frames, -1, rows.shape[-1])
    per_frame = grid.shape[1]
    score = torch.full((frames, per_frame), 255.0)
    score[1:] = 1 - torch.nn.functional.cosine_similarity(grid[1:], grid[:-1], dim=-1)
    keep = max(per_frame, int(per_frame * frames * (1 - rate)))
    top = torch.argsort(score.flatten(), descending=True, stable=True)[:keep]
    mask = torch.zeros(frames * per_frame, dtype=torch.bool)
    mask[top] = True
    return mask


def _reference_tokens(rate: float, family: str = "qwen2_vl", clip: bytes = CLIP) -> tuple[list[int], int]:
    """Greedy tokens of transformers' whole model on the pruned prompt, and the unpruned prompt's length:
    embeddings (and Qwen3-VL's deepstack rows) from its own get_video_features, positions from its own
    get_rope_index on the unpruned prompt, the dropped video tokens then left out of ids, embeddings
    and positions; its language model and lm_head run on them."""
    model, inputs = _inputs(tiny_checkpoint(family), PROMPT, [], "AutoModelForImageTextToText",
                            OtherMedia(videos=(clip,)))
    ids = inputs["input_ids"]  # [1, L]
    grid = inputs["video_grid_thw"]
    seconds = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    video = ids[0] == model.config.video_token_id
    language_model, embed = model.model.language_model, model.get_input_embeddings()
    with torch.inference_mode():
        features = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=grid)
        rows = features.pooler_output[0]
        deepstack = [layer[0] for layer in getattr(features, "deepstack_features", None) or []]
        positions, delta = model.model.get_rope_index(ids, mm_token_type_ids=video.long()[None] * 2,
                                                      video_grid_thw=grid, **seconds)
        keep_rows = _vllm_style_mask(rows, int(grid[0, 0]), rate)
        present = ~video
        present[video.nonzero()[:, 0][keep_rows]] = True
        embeds = embed(ids[:, present])
        visual = video[present]
        embeds[0, visual] = rows[keep_rows]
        extra = ({"visual_pos_masks": visual[None], "deepstack_visual_embeds": [d[keep_rows] for d in deepstack]}
                 if deepstack else {})
        length = int(present.sum())
        delta = int(delta) + (ids.shape[1] - length)  # decode positions continue the unpruned prompt's
        out = language_model(inputs_embeds=embeds, position_ids=positions[:, :, present], use_cache=True, **extra)
        tokens: list[int] = []
        eos = model.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or ())
        while True:
            token = int(model.lm_head(out.last_hidden_state[0, -1]).argmax())
            tokens.append(token)
            if token in eos or len(tokens) == MAX_NEW_TOKENS:
                return tokens, ids.shape[1]
            step = torch.full((3, 1, 1), length + len(tokens) - 1 + delta)
            out = language_model(inputs_embeds=embed(torch.tensor([[token]])), position_ids=step,
                                 past_key_values=out.past_key_values, use_cache=True)


@pytest.mark.e2e
def test_pruned_video_matches_the_independent_reference(services):
    """Server default 0.5: 24 video tokens (4 frame groups x 6) become 12; same tokens as the reference."""
    completion = _generate(services, _request())
    expected, unpruned_length = _reference_tokens(SERVER_RATE)
    assert unpruned_length == hf_prompt_tokens(tiny_checkpoint("qwen2_vl"), PROMPT, [],
                                               other=OtherMedia(videos=(CLIP,)))
    assert completion.prompt_tokens == unpruned_length - 12
    assert list(completion.token_ids) == expected
    # power: pruning changes the answer on this clip, so the equality above says the kept rows and
    # their positions are the reference's
    assert expected != hf_generate(tiny_checkpoint("qwen2_vl"), PROMPT, [], MAX_NEW_TOKENS,
                                   other=OtherMedia(videos=(CLIP,)))


@pytest.mark.e2e
def test_request_rate_overrides_the_server_default(services):
    """A request's rate 0 is the unpruned path, token-exact with transformers; 0.75 keeps 6 (one frame)."""
    other = OtherMedia(videos=(CLIP,))
    unpruned = _generate(services, _request(0.0))
    assert list(unpruned.token_ids) == hf_generate(tiny_checkpoint("qwen2_vl"), PROMPT, [], MAX_NEW_TOKENS, other=other)
    assert unpruned.prompt_tokens == hf_prompt_tokens(tiny_checkpoint("qwen2_vl"), PROMPT, [], other=other)
    most = _generate(services, _request(0.75))
    assert most.prompt_tokens == unpruned.prompt_tokens - 18
    assert list(most.token_ids) == _reference_tokens(0.75)[0]


@pytest.mark.e2e
def test_preprocess_shows_the_pruned_request(services):
    """The encoder is asked for the retained count; the LLM's placeholder run has that length."""
    with grpc.insecure_channel(services.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        reply = stub.Preprocess(processor_pb2.PreprocessRequest(messages=_request(0.25)), timeout=120)
        plain = stub.Preprocess(processor_pb2.PreprocessRequest(messages=_request(0.0)), timeout=120)
    (item,) = reply.encode_request.items
    assert item.video_pruning.rate == 0.25 and item.video_pruning.retained_tokens == 18
    assert not plain.encode_request.items[0].HasField("video_pruning")
    assert item.mm_hash != plain.encode_request.items[0].mm_hash  # the rate is part of the video's identity
    (mm,) = reply.llm_request.prompt.multimodal_inputs
    assert mm.placeholder.length == 18
    assert len(reply.llm_request.prompt.token_ids) == len(plain.llm_request.prompt.token_ids) - 6


@pytest.mark.e2e
@pytest.mark.parametrize("rate", [1.0, -0.25, float("nan")])
def test_rate_outside_zero_one_is_invalid(services, rate):
    with pytest.raises(grpc.RpcError) as caught:
        _generate(services, _request(rate))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "VIDEO_PRUNING_RATE_INVALID"
    assert "pruning_rate" in caught.value.details()
    assert _generate(services, _request(0.5)).completion_tokens > 0  # still serving


@pytest.mark.e2e
def test_router_path_and_the_llms_checks_of_kept_indexes(services):
    """Preprocess, the encoder and the LLM called directly, as an external router does: the encoder's
    kept indexes travel with its rows; the LLM refuses indexes that do not fit the item."""
    with (grpc.insecure_channel(services.address) as p, grpc.insecure_channel(services.encoder.address) as e,
          grpc.insecure_channel(services.llm.address) as m):
        pre = processor_pb2_grpc.ProcessorServiceStub(p).Preprocess(processor_pb2.PreprocessRequest(
            messages=_request(), sampling=generation_pb2.SamplingParams(max_new_tokens=MAX_NEW_TOKENS)), timeout=120)
        (encoded,) = encoder_pb2_grpc.EncoderServiceStub(e).Encode(pre.encode_request, timeout=120).items
        llm = llm_pb2_grpc.LlmServiceStub(m)
        request = llm_pb2.GenerateRequest()
        request.CopyFrom(pre.llm_request)
        (mm,) = request.prompt.multimodal_inputs
        mm.embeddings.CopyFrom(encoded.embeddings)
        mm.kept_token_indexes[:] = encoded.kept_token_indexes
        assert list(llm.Generate(request, timeout=120).token_ids) == _reference_tokens(SERVER_RATE)[0]
        kept = list(encoded.kept_token_indexes)
        for bad, reason in ((kept[::-1], "VIDEO_KEPT_TOKENS_INVALID"),  # not ascending
                            ([*kept[:-1], 24], "VIDEO_KEPT_TOKENS_INVALID"),  # past the 24 unpruned tokens
                            (kept[:-1], "VIDEO_KEPT_TOKENS_INVALID"),  # one short of the placeholders
                            ([], "POSITION_INPUT_INVALID")):  # unpruned, the grid means 24 tokens, not 12
            mm.kept_token_indexes[:] = bad
            with pytest.raises(grpc.RpcError) as caught:
                llm.Generate(request, timeout=60)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert error_info(caught.value).reason == reason, bad


@pytest.mark.e2e
def test_bench_evs_smoke(tmp_path):
    """bench/evs.py --quick runs and reports the same count saved on both clips, the still clip's later
    frame groups all near-copies and the moving clip's not."""
    out = tmp_path / "evs.json"
    run = subprocess.run([sys.executable, "bench/evs.py", "--quick", "--model", str(tiny_checkpoint("qwen2_vl")),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    still, moving = json.loads(out.read_text())["clips"]
    assert still["saved"] == moving["saved"] == 12
    assert still["later_tokens_near_copies"] == still["later_tokens"] > moving["later_tokens_near_copies"]


# Qwen2.5-VL (seconds per grid step in its positions) and Qwen3-VL (a run per timestamped frame group,
# deepstack): 8 s at 2 fps, 8 frame groups. The tiny Qwen3-VL's groups are one token each, so half of
# them are dropped whole: their timestamps and empty markers stay, and the positions still match.
LONG_CLIP = video_bytes(seconds=8, seed=2)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def family_services(request):
    model = tiny_checkpoint(request.param)
    encoder, llm = start_encoder(model), start_llm(model)
    processor = start_processor(model, wait_listening(encoder), wait_listening(llm), None,
                                "--video-pruning-rate", str(SERVER_RATE))
    wait_listening(processor)
    started = ServiceSet(encoder, llm, processor)
    for proc in (encoder, llm, processor):
        wait_serving(proc.address)
    yield request.param, started
    started.stop()


@pytest.mark.e2e
def test_other_qwen_families_prune_as_the_reference(family_services):
    family, services = family_services
    completion = _generate(services, _request(clip=LONG_CLIP))
    expected, unpruned_length = _reference_tokens(SERVER_RATE, family, LONG_CLIP)
    with grpc.insecure_channel(services.address) as channel:
        plain = processor_pb2_grpc.ProcessorServiceStub(channel).Preprocess(
            processor_pb2.PreprocessRequest(messages=_request(0.0, LONG_CLIP)), timeout=120)
    full = sum(mm.placeholder.length for mm in plain.llm_request.prompt.multimodal_inputs)
    per_frame = full // 8
    assert len(plain.llm_request.prompt.token_ids) == unpruned_length
    assert completion.prompt_tokens == unpruned_length - (full - max(per_frame, int(full * (1 - SERVER_RATE))))
    assert list(completion.token_ids) == expected
    unpruned = hf_generate(tiny_checkpoint(family), PROMPT, [], MAX_NEW_TOKENS, other=OtherMedia(videos=(LONG_CLIP,)))
    assert expected != unpruned  # power: pruning changes the answer
    assert _reference_tokens(0.0, family, LONG_CLIP)[0] == unpruned  # and the reference is transformers' at rate 0


@pytest.mark.e2e
def test_processor_refuses_to_start_with_a_bad_default_rate():
    run = subprocess.run([sys.executable, "-m", "services.cli", "serve", "processor", "--model",
                          str(tiny_checkpoint("qwen2_vl")), "--encoder", "127.0.0.1:1", "--llm", "127.0.0.1:1",
                          "--video-pruning-rate", "1.5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "VIDEO_PRUNING_RATE_INVALID" in run.stderr and "--video-pruning-rate" in run.stderr
