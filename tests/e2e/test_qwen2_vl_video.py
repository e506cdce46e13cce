"""Qwen2-VL video through the three services (separate processes) against transformers run whole:
frames chosen by the model's own video processor at 2 fps, only those decoded, same tokens."""

from __future__ import annotations

import pytest

from tests.parity import VIDEO_CASES, media_parity_tests


@pytest.fixture(scope="module")
def services(qwen2_vl_services):
    return qwen2_vl_services


test_video_parity = media_parity_tests("qwen2_vl", VIDEO_CASES)
