"""Qwen2.5-VL video through the three services (separate processes) against transformers run whole.

Its mRoPE counts the temporal axis in seconds (second_per_grid_ts among the video's position inputs).
At the shared cases' 2 fps sampling that is 1 s per grid step, which is also transformers' default
when it is missing: the 1 fps clip (2 s per step) is the case where dropping it would change tokens,
and test_seconds_per_step_matter shows that it does in transformers itself.
"""

from __future__ import annotations

import pytest
import torch

from tests.checkpoints import tiny_checkpoint
from tests.media import video_bytes
from tests.parity import MAX_NEW_TOKENS, VIDEO_CASES, family_services, media_parity_tests
from tests.reference import OtherMedia, _inputs

CASES = {
    **VIDEO_CASES,
    "video-1fps": ("Describe this video.", [], OtherMedia(videos=(video_bytes(seconds=6, fps=1, seed=4),))),
}

services = family_services("qwen2_5_vl")
test_video_parity = media_parity_tests("qwen2_5_vl", CASES)


@pytest.mark.e2e
def test_seconds_per_step_matter():
    """Power of the 1 fps case: transformers with second_per_grid_ts forced to 1 decodes other tokens."""
    prompt, images, other = CASES["video-1fps"]
    model, inputs = _inputs(tiny_checkpoint("qwen2_5_vl"), prompt, images, "AutoModelForImageTextToText", other)
    assert inputs["second_per_grid_ts"].tolist() == [2.0]
    tokens = []
    for seconds in (inputs["second_per_grid_ts"], torch.ones(1)):
        with torch.inference_mode():
            out = model.generate(**{**inputs, "second_per_grid_ts": seconds}, max_new_tokens=MAX_NEW_TOKENS,
                                 do_sample=False)
        tokens.append(out[0, inputs["input_ids"].shape[1]:].tolist())
    assert tokens[0] != tokens[1]
