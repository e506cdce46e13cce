"""GLM-4.6V: the three services (separate processes) give transformers' greedy tokens (images and text;
mRoPE on the rotary half of each head, computed by the model's own get_rope_index)."""

from __future__ import annotations

from tests.parity import family_services, model_info_test, parity_tests

services = family_services("glm46v")
test_parity = parity_tests("glm46v")
test_model_info = model_info_test("glm46v")
