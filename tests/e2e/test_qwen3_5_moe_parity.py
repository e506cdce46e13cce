"""Qwen3.5-MoE: the three services (separate processes) give transformers' greedy tokens.

The hybrid cache is proven in test_qwen3_5_parity.py; what is new here is the mixture of experts, so
the tiny checkpoint must really route: its tokens score different experts highest, asserted before
parity is worth anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from tests.checkpoints import tiny_checkpoint
from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("qwen3_5_moe")
test_parity = parity_tests("qwen3_5_moe")
test_model_info = model_info_test("qwen3_5_moe")
test_video_parity = media_parity_tests("qwen3_5_moe", VIDEO_CASES)  # Qwen3-VL's timestamped runs


@pytest.mark.e2e
def test_tokens_are_routed_to_several_experts():
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen3_5_moe"), dtype=torch.float32).eval()
    text = model.model.language_model
    layer = text.layers[0]
    hidden = layer.post_attention_layernorm(text.embed_tokens(torch.arange(200)[None])[0])  # [200, H]
    with torch.no_grad():
        top = F.linear(hidden, layer.mlp.gate.weight).argmax(-1)  # [200]: each token's highest-scored expert
    assert len(set(top.tolist())) > 1, "every token scores the same expert highest: the MoE is inert"
