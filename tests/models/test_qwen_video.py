"""Qwen2.5-VL and Qwen3-VL video, family code alone against transformers' processor and get_rope_index:
the frames we choose and decode give transformers' own prompt (Qwen3-VL's timestamps included), the
items' runs and position inputs, and the LLM's mRoPE positions from them, run by run."""

from __future__ import annotations

import io
import math
import re
from functools import lru_cache

import pytest
import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from services.common.errors import InvalidArgument
from services.common.video import VideoLimits, decode_video
from services.models.base import IMAGE, VIDEO, ItemEmbeddings, ModelFamily, PlacedEmbeddings, ProcessedPrompt
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.media import image_bytes, video_bytes
from tests.reference import _load_video

LIMITS = VideoLimits(max_frame_pixels=1 << 20, max_seconds=60, max_frames=32, max_total_pixels=1 << 26)
FPS = 2.0  # the processor service's default --video-fps
CLIPS = {  # frames sampled at 2 fps by Qwen3-VL's video processor
    "4-frames": video_bytes(seed=1),  # 2 s at 8 fps
    "5-frames": video_bytes(seconds=2.5, seed=2),  # odd: the processor repeats the last frame's index
    "8-frames-1fps": video_bytes(seconds=8, fps=1, seed=3),  # every frame, 2 s per grid step
}


@lru_cache(maxsize=2)
def _family(name: str) -> tuple[ModelFamily, ProcessorMixin, PreTrainedModel]:
    path = tiny_checkpoint(name)
    family = family_for(path)
    return family, family.load_processor(path), family.load_model(path, torch.float32, "cpu")


def _ours(name: str, clip: bytes, with_image: bool = False, max_frames: int = 32) -> tuple[ProcessedPrompt, list[int]]:
    """The processor service's way: the family chooses the frames, only they are decoded."""
    family, processor, _ = _family(name)
    video = decode_video(clip, LIMITS, lambda meta: family.video_frame_indices(processor, meta, FPS, max_frames),
                         "video")
    images = [_image()] if with_image else []
    content = [{"type": IMAGE}] * len(images) + [{"type": VIDEO}, {"type": "text", "text": "What happens?"}]
    text = family.render_chat(processor, [{"role": "user", "content": content}])
    return family.preprocess(processor, text, images, videos=[video]), video.metadata.frames_indices


def _theirs(name: str, clip: bytes, with_image: bool = False, sampling: dict | None = None):
    """transformers' way: its loader decodes every frame, its video processor samples them (at FPS, or
    as `sampling` says)."""
    _, processor, _ = _family(name)
    frames, metadata = _load_video(clip)
    images = [_image()] if with_image else []
    content = [{"type": IMAGE}] * len(images) + [{"type": VIDEO}, {"type": "text", "text": "What happens?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return processor(text=[text], images=images or None, videos=[frames], video_metadata=[metadata],
                     do_sample_frames=True, return_tensors="pt", **(sampling or {"fps": FPS}))


def _image() -> Image.Image:
    return Image.open(io.BytesIO(image_bytes(64, 96, seed=7)))


def _placed(family: ModelFamily, prompt: ProcessedPrompt) -> list[PlacedEmbeddings]:
    """What the LLM service makes of the processor's request: one entry per placeholder run."""
    placed = []
    for item in prompt.items:
        for index, (offset, length) in enumerate(item.placeholder_runs):
            rows = torch.zeros(length, family.hidden_size)
            deepstack = tuple(torch.zeros_like(rows) for _ in range(family.num_deepstack_layers))
            position_inputs = item.position_inputs_of_run(index)
            family.check_position_inputs(item.modality, position_inputs, length, where="test")
            placed.append(PlacedEmbeddings(item.modality, offset, length, ItemEmbeddings(rows, deepstack),
                                           position_inputs))
    return placed


def _positions(name: str, prompt: ProcessedPrompt) -> torch.Tensor:
    family, _, model = _family(name)
    with torch.inference_mode():
        return family.prefill_inputs(model, torch.tensor(prompt.token_ids), _placed(family, prompt)).position_ids


def _their_positions(name: str, inputs, **overrides) -> torch.Tensor:
    _, _, model = _family(name)
    kwargs = {key: inputs[key] for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if key in inputs}
    return model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"], **{**kwargs, **overrides})[0]


# ---- Qwen3-VL: timestamps, one run per frame group ------------------------------------------------
@pytest.mark.parametrize("clip", list(CLIPS))
def test_qwen3_vl_timestamps_are_transformers(clip):
    """Our chosen frames with do_sample_frames=False give the prompt transformers writes when it samples."""
    prompt, indices = _ours("qwen3_vl", CLIPS[clip])
    assert prompt.token_ids == _theirs("qwen3_vl", CLIPS[clip])["input_ids"][0].tolist()
    # and the times are the frame groups' mean times, from the chosen indices and the clip's fps
    _, processor, _ = _family("qwen3_vl")
    fps = 1 if clip.endswith("1fps") else 8
    padded = indices + indices[-1:] * (len(indices) % 2)
    expected = [f"{(padded[i] + padded[i + 1]) / 2 / fps:.1f}" for i in range(0, len(padded), 2)]
    assert re.findall(r"<([\d.]+) seconds>", processor.tokenizer.decode(prompt.token_ids)) == expected


def test_qwen3_vl_frame_cap_is_transformers_num_frames():
    """Where --max-video-frames caps the 2 fps sampling, the frames and times are transformers' own
    sampling of that many frames (its sample_frames with num_frames)."""
    prompt, indices = _ours("qwen3_vl", CLIPS["8-frames-1fps"], max_frames=4)
    assert indices == [0, 2, 5, 7]
    theirs = _theirs("qwen3_vl", CLIPS["8-frames-1fps"], sampling={"num_frames": 4, "fps": None})
    assert prompt.token_ids == theirs["input_ids"][0].tolist()


@pytest.mark.parametrize("clip", list(CLIPS))
def test_qwen3_vl_video_is_a_run_per_frame_group(clip):
    family, processor, _ = _family("qwen3_vl")
    prompt, _ = _ours("qwen3_vl", CLIPS[clip])
    (item,) = prompt.items
    t, h, w = item.encoder_inputs["video_grid_thw"][0].tolist()
    per_step = h * w // family.spatial_merge_size**2
    assert t >= 2 and len(item.runs) == t and item.length == t * per_step == sum(n for _, n in item.runs)
    assert item.offset == item.runs[0][0]
    video_pad = family.placeholder_token_id(processor.tokenizer, VIDEO)
    for (offset, length), positions in zip(item.runs, item.run_position_inputs, strict=True):
        assert length == per_step and set(prompt.token_ids[offset : offset + length]) == {video_pad}
        assert positions["video_grid_thw"].tolist() == [[1, h, w]]
        # each run is preceded by its timestamp and <|vision_start|>
        assert processor.tokenizer.decode(prompt.token_ids[offset - 1]) == "<|vision_start|>"


@pytest.mark.parametrize("clip", ["4-frames", "5-frames"])
@pytest.mark.parametrize("with_image", [False, True])
def test_qwen3_vl_positions_are_transformers(clip, with_image):
    """Run by run, the LLM's mRoPE positions are get_rope_index's on the whole prompt and grid."""
    prompt, _ = _ours("qwen3_vl", CLIPS[clip], with_image)
    assert [item.modality for item in prompt.items] == [IMAGE] * with_image + [VIDEO]
    assert torch.equal(_positions("qwen3_vl", prompt), _their_positions("qwen3_vl", _theirs("qwen3_vl", CLIPS[clip],
                                                                                              with_image)))


def test_qwen3_vl_llm_refuses_a_run_with_several_steps():
    """A run's grid must be one frame group: get_rope_index would position t steps as one."""
    family, _, _ = _family("qwen3_vl")
    family.check_position_inputs(VIDEO, {"video_grid_thw": torch.tensor([[1, 2, 4]])}, 2, where="mm")
    with pytest.raises(InvalidArgument) as caught:
        family.check_position_inputs(VIDEO, {"video_grid_thw": torch.tensor([[2, 2, 4]])}, 4, where="mm")
    assert caught.value.reason == "POSITION_INPUT_INVALID" and "t = 1" in caught.value.message


# ---- Qwen2.5-VL: seconds per grid step ----------------------------------------------------------
@pytest.mark.parametrize("clip", ["4-frames", "8-frames-1fps"])
def test_qwen2_5_vl_positions_count_seconds(clip):
    prompt, _ = _ours("qwen2_5_vl", CLIPS[clip], with_image=True)
    theirs = _theirs("qwen2_5_vl", CLIPS[clip], with_image=True)
    assert prompt.token_ids == theirs["input_ids"][0].tolist()
    image, video = prompt.items
    assert "second_per_grid_ts" not in video.encoder_inputs and "second_per_grid_ts" not in image.position_inputs
    assert torch.equal(video.position_inputs["second_per_grid_ts"], theirs["second_per_grid_ts"])
    ours = _positions("qwen2_5_vl", prompt)
    assert torch.equal(ours, _their_positions("qwen2_5_vl", theirs))
    if clip.endswith("1fps"):  # 2 s per grid step: without it the positions would differ
        assert theirs["second_per_grid_ts"].tolist() == [2.0]
        assert not torch.equal(ours, _their_positions("qwen2_5_vl", theirs, second_per_grid_ts=None))


@pytest.mark.parametrize("seconds", [None, 0.0, -1.0, math.nan, math.inf])
def test_qwen2_5_vl_llm_refuses_bad_seconds(seconds):
    family, _, _ = _family("qwen2_5_vl")
    grid = torch.tensor([[2, 4, 6]])
    family.check_position_inputs(VIDEO, {"video_grid_thw": grid, "second_per_grid_ts": torch.tensor([2.0])}, 12,
                                 where="mm")
    tensors = {"video_grid_thw": grid}
    if seconds is not None:
        tensors["second_per_grid_ts"] = torch.tensor([seconds])
    with pytest.raises(InvalidArgument) as caught:
        family.check_position_inputs(VIDEO, tensors, 12, where="mm")
    assert caught.value.reason == "POSITION_INPUT_INVALID" and "second_per_grid_ts" in caught.value.message
