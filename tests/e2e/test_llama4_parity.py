"""Llama 4: the three services give transformers' greedy tokens: tiled images whose tiles' runs sit
between separator tokens, a global view, chunked attention and temperature-tuned NoPE layers (the
tiny checkpoint's chunk and floor_scale are small enough that the prompts cross them)."""

from __future__ import annotations

from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint
from tests.parity import family_services, model_info_test, parity_tests

services = family_services("llama4")
test_parity = parity_tests("llama4")
test_model_info = model_info_test("llama4")


def test_tiny_prompts_cross_a_chunk_and_the_temperature_floor():
    """What makes parity mean something here: the text model's chunk and temperature floor are shorter
    than the prompts of the cases (each over 30 tokens), and images span several runs."""
    text = family_for(tiny_checkpoint("llama4")).text_config
    assert text.attention_chunk_size <= 16 and text.floor_scale <= 8 and text.attn_temperature_tuning
    assert "full_attention" in text.layer_types and "chunked_attention" in text.layer_types
