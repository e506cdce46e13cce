"""GLM-4.5V (glm4v_moe): the three services (separate processes) give transformers' greedy tokens.

The split is GLM-4.1V's; what is new is the mixture-of-experts language model, so the tiny checkpoint
must really route: its tokens score different experts highest, asserted before parity is worth anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from tests.checkpoints import tiny_checkpoint
from tests.parity import family_services, model_info_test, parity_tests

services = family_services("glm4v_moe")
test_parity = parity_tests("glm4v_moe")
test_model_info = model_info_test("glm4v_moe")


@pytest.mark.e2e
def test_tokens_are_routed_to_several_experts():
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint("glm4v_moe"), dtype=torch.float32).eval()
    text = model.model.language_model
    moe = next(layer for layer in text.layers if hasattr(layer.mlp, "gate"))  # after the dense first layers
    hidden = moe.post_attention_layernorm(text.embed_tokens(torch.arange(200)[None])[0])  # [200, H]
    with torch.no_grad():
        top = F.linear(hidden, moe.mlp.gate.weight).argmax(-1)  # [200]: each token's highest-scored expert
    assert len(set(top.tolist())) > 1, "every token scores the same expert highest: the MoE is inert"
