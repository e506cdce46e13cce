"""PaddleOCR-VL: the three services (separate processes) give transformers' greedy tokens (images and
text; the model's own get_rope_index positions, as Qwen2-VL)."""

from __future__ import annotations

from tests.parity import family_services, model_info_test, parity_tests

services = family_services("paddleocr_vl")
test_parity = parity_tests("paddleocr_vl")
test_model_info = model_info_test("paddleocr_vl")
