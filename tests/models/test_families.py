"""The family interface as every family implements it: overrides that do something, honest contracts."""

from __future__ import annotations

import typing

import pytest
import torch

from services.models.base import ModelFamily, ServeVerdict
from services.models.generic import Generic
from services.models.registry import family_for
from tests.checkpoints import tiny_checkpoint

CHECKPOINTS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "internvl", "gemma3", "phi4mm",
               "nemotron_h_omni", "idefics3", "llava_onevision"]


def _kept(family: ModelFamily, strip) -> set[str]:
    model = family.load_model(tiny_checkpoint(family.name if family.name != "generic" else "idefics3"),
                              torch.float32, "cpu")
    strip(model)
    return {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_strip_for_llm_overrides_are_not_the_default(name):
    """A family that overrides strip_for_llm keeps other weights than the base default would (or the
    default cannot handle its layout): an override that does what the default does is dead code."""
    family = family_for(tiny_checkpoint(name))
    if type(family).strip_for_llm is ModelFamily.strip_for_llm:
        return
    try:
        default = _kept(family, lambda model: ModelFamily.strip_for_llm(family, model))
    except (NotImplementedError, AttributeError):  # the default does not know this layout: the override is needed
        return
    assert _kept(family, family.strip_for_llm) != default, f"{type(family).__name__}.strip_for_llm is the default"


def test_can_serve_returns_its_verdict():
    """Typed as it behaves: a verdict, for the folders it serves, refuses or leaves to others."""
    assert typing.get_type_hints(Generic.can_serve)["return"] is ServeVerdict
    assert typing.get_type_hints(ModelFamily.can_serve)["return"] is ServeVerdict
    assert ModelFamily.can_serve(tiny_checkpoint("llava")) == ServeVerdict(serves=False)
