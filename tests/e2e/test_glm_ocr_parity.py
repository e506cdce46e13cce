"""GLM-OCR: the three services (separate processes) give transformers' greedy tokens (images, video and
text; the model's own get_rope_index positions, as GLM-4.1V)."""

from __future__ import annotations

from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("glm_ocr")
test_parity = parity_tests("glm_ocr")
test_model_info = model_info_test("glm_ocr")
test_video_parity = media_parity_tests("glm_ocr", {case: VIDEO_CASES[case] for case in ("video", "video-other")})
