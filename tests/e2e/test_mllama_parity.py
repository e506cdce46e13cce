"""Llama 3.2 Vision parity: the three services against MllamaForConditionalGeneration run whole.

Images enter through cross-attention layers: the encoder returns each image's cross-attention states
(ItemEmbeddings.cross_attention_states), the LLM projects them to the cross-attention layers' keys and
values at prefill and keeps them for decode. Single image, two images (their tokens adjacent, so the
processor's rule that consecutive images all see to the end is exercised), text-only.
"""

from tests.parity import family_services, model_info_test, parity_tests

services = family_services("mllama")
test_parity = parity_tests("mllama")
test_model_info = model_info_test("mllama")
