"""Qwen3.5: the three services (separate processes) give transformers' greedy tokens, through a hybrid
language model whose cache holds linear-attention state beside the KV cache.

Parity means something only if the linear-attention layers' state carries the prompt: the check below
asserts that the tiny model has such layers and that the engine's cache for it keeps their state.
"""

from __future__ import annotations

import pytest
from transformers import AutoConfig
from transformers.cache_utils import DynamicLayer, LinearAttentionLayer

from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("qwen3_5")
test_parity = parity_tests("qwen3_5")
test_model_info = model_info_test("qwen3_5")
test_video_parity = media_parity_tests("qwen3_5", VIDEO_CASES)  # Qwen3-VL's timestamped runs


@pytest.mark.e2e
def test_cache_keeps_linear_attention_state_and_kv():
    model_dir = tiny_checkpoint("qwen3_5")
    layer_types = AutoConfig.from_pretrained(model_dir).text_config.layer_types
    assert {"linear_attention", "full_attention"} <= set(layer_types)
    cache = family_for(model_dir).new_cache(model=None)
    assert [type(layer) for layer in cache.layers] == [
        LinearAttentionLayer if kind == "linear_attention" else DynamicLayer for kind in layer_types]
