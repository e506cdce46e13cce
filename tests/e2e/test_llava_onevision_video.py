"""LLaVA-OneVision video through the three services (separate processes) against transformers run
whole: frames chosen by the model's own video processor at 2 fps, each frame one tile pooled to half
its patch grid, one image_newline row closing the clip; with an image before it in one prompt."""

from __future__ import annotations

from tests.parity import VIDEO_CASES, family_services, media_parity_tests

services = family_services("llava_onevision")
test_video_parity = media_parity_tests("llava_onevision", VIDEO_CASES)
