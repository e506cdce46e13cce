"""Qwen3-VL video through the three services (separate processes) against transformers run whole:
the timestamps its processor writes before each frame group (so one video is several placeholder
runs), mRoPE per run, and deepstack rows at the video positions beside the images'.

Unlike the images, the tiny checkpoint's deepstack moves the video cases' tokens without scaling
(test_deepstack_matters_for_video): their parity alone shows the deepstack rows reach the LLM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.checkpoints import scaled_deepstack, tiny_checkpoint
from tests.media import video_bytes
from tests.parity import MAX_NEW_TOKENS, VIDEO_CASES, family_services, media_parity_tests
from tests.reference import OtherMedia, hf_generate

CASES = {
    **VIDEO_CASES,
    # 2.5 s at 8 fps: 5 frames at 2 fps, padded to 6 by the processor: 3 timestamped runs, the last
    # one's time from a repeated frame index.
    "video-odd-frames": ("What happens?", [], OtherMedia(videos=(video_bytes(seconds=2.5, seed=4),))),
}

services = family_services("qwen3_vl")
test_video_parity = media_parity_tests("qwen3_vl", CASES)


@pytest.fixture(scope="module")
def zeroed(tmp_path_factory) -> Path:
    """The tiny checkpoint with its deepstack rows zeroed: transformers without deepstack."""
    return scaled_deepstack(tiny_checkpoint("qwen3_vl"), tmp_path_factory.mktemp("qwen3_vl") / "deepstack-x0", 0.0)


@pytest.mark.e2e
@pytest.mark.parametrize("case", ["video", "image-and-video"])
def test_deepstack_matters_for_video(zeroed, case):
    """Power of the parity above: without deepstack, transformers itself decodes other tokens."""
    prompt, images, other = CASES[case]
    expected = hf_generate(tiny_checkpoint("qwen3_vl"), prompt, images, MAX_NEW_TOKENS, other=other)
    assert hf_generate(zeroed, prompt, images, MAX_NEW_TOKENS, other=other) != expected
