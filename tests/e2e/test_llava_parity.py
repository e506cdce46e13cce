"""LLaVA-1.5 parity: the three services against LlavaForConditionalGeneration run whole."""

from tests.parity import family_services, parity_tests

services = family_services("llava")
test_parity = parity_tests("llava")
