"""Qwen3-VL-MoE: the three services (separate processes) give transformers' greedy tokens.

The family is Qwen3-VL's (deepstack is proven carried in test_qwen3_vl_parity.py); what is new here is
the mixture-of-experts language model, so the tiny checkpoint must really route: its tokens pick
different experts, which the check below asserts before parity is worth anything.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tests.checkpoints import tiny_checkpoint
from tests.parity import VIDEO_CASES, family_services, media_parity_tests, model_info_test, parity_tests

services = family_services("qwen3_vl_moe")
test_parity = parity_tests("qwen3_vl_moe")
test_model_info = model_info_test("qwen3_vl_moe")
test_video_parity = media_parity_tests("qwen3_vl_moe", VIDEO_CASES)  # Qwen3-VL's timestamped runs


@pytest.mark.e2e
def test_tokens_are_routed_to_several_experts():
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("qwen3_vl_moe"), dtype=torch.float32).eval()
    text = model.model.language_model
    hidden = text.embed_tokens(torch.arange(200)[None])[0]  # [200, H]: 200 different tokens
    _, _, experts = text.layers[0].mlp.gate(text.layers[0].post_attention_layernorm(hidden))  # [200, top_k]
    assert len(set(experts[:, 0].tolist())) > 1, "every token takes the same first expert: the MoE is inert"
