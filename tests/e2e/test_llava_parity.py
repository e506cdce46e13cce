"""LLaVA-1.5 parity: the three services against LlavaForConditionalGeneration run whole."""

from tests.parity import family_services, model_info_test, parity_tests

services = family_services("llava")
test_parity = parity_tests("llava")
test_model_info = model_info_test("llava")
