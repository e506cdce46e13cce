"""Qwen2.5-VL through the three services (separate processes) against transformers run whole.

Images: greedy tokens equal, and the tiny checkpoint's windowed vision tower really windows the test
images. Video: its mRoPE counts the temporal axis in seconds (second_per_grid_ts among the video's
position inputs). At the shared cases' 2 fps sampling that is 1 s per grid step, which is also
transformers' default when it is missing: the 1 fps clip (2 s per step) is the case where dropping it
would change tokens, and test_seconds_per_step_matter shows that it does in transformers itself.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
from transformers.vision_utils import get_vision_window_index

from tests.checkpoints import tiny_checkpoint
from tests.media import video_bytes
from tests.parity import (
    CASES,
    MAX_NEW_TOKENS,
    VIDEO_CASES,
    family_services,
    media_parity_tests,
    model_info_test,
    parity_tests,
)
from tests.reference import OtherMedia, _inputs

MEDIA_CASES = {
    **VIDEO_CASES,
    "video-1fps": ("Describe this video.", [], OtherMedia(videos=(video_bytes(seconds=6, fps=1, seed=4),))),
}

services = family_services("qwen2_5_vl")
test_parity = parity_tests("qwen2_5_vl")
test_model_info = model_info_test("qwen2_5_vl")
test_video_parity = media_parity_tests("qwen2_5_vl", MEDIA_CASES)


def _image_inputs(model_dir, images: list[bytes]):
    processor = AutoProcessor.from_pretrained(model_dir)
    pil = [Image.open(io.BytesIO(data)) for data in images]
    return processor.image_processor(images=pil, return_tensors="pt")


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["one-image", "one-image-other", "two-images"])
def test_test_images_span_several_windows(case):
    """Window attention is only exercised if an image is larger than one window."""
    model_dir = tiny_checkpoint("qwen2_5_vl")
    vision = AutoConfig.from_pretrained(model_dir).vision_config
    assert 0 < len(vision.fullatt_block_indexes) < vision.depth, "some blocks must attend within windows"
    grids = _image_inputs(model_dir, CASES[case][1])["image_grid_thw"]
    for grid in grids:
        _, cu_window_seqlens = get_vision_window_index(grid[None], vision.spatial_merge_size, vision.window_size,
                                                       vision.patch_size)
        assert len(cu_window_seqlens) - 1 >= 2, f"grid {grid.tolist()} fits in one window"


@pytest.mark.e2e
def test_window_attention_changes_the_embeddings():
    """The same weights with full attention in every block give other rows: windows matter."""
    model_dir = tiny_checkpoint("qwen2_5_vl")
    inputs = _image_inputs(model_dir, CASES["one-image"][1])
    rows = {}
    for name, overrides in (("windowed", {}), ("full", {"fullatt_block_indexes": list(range(64))})):
        config = AutoConfig.from_pretrained(model_dir)
        for key, value in overrides.items():
            setattr(config.vision_config, key, value)
        model = AutoModelForImageTextToText.from_pretrained(model_dir, config=config, dtype=torch.float32).eval()
        with torch.inference_mode():
            out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        rows[name] = torch.cat(out.pooler_output)
    assert rows["windowed"].shape == rows["full"].shape
    assert (rows["windowed"] - rows["full"]).abs().max() > 1e-2


@pytest.mark.e2e
def test_seconds_per_step_matter():
    """Power of the 1 fps case: transformers with second_per_grid_ts forced to 1 decodes other tokens."""
    prompt, images, other = MEDIA_CASES["video-1fps"]
    model, inputs = _inputs(tiny_checkpoint("qwen2_5_vl"), prompt, images, "AutoModelForImageTextToText", other)
    assert inputs["second_per_grid_ts"].tolist() == [2.0]
    tokens = []
    for seconds in (inputs["second_per_grid_ts"], torch.ones(1)):
        with torch.inference_mode():
            out = model.generate(**{**inputs, "second_per_grid_ts": seconds}, max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
        tokens.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert tokens[0] != tokens[1]
