"""Model families by Hugging Face architecture, and the family of a checkpoint folder.

A static table maps each architecture to the module and class of its family, as vLLM's
model_executor/models/registry.py does: a family's module is imported only when a checkpoint of it
is served (or `triptych models` lists the families). A family whose import fails, say because the
installed transformers renamed something it imports, is then reported unavailable with the error
while every other family serves.

Adding a family is adding its file in services/models/ and its rows here;
tests/models/test_registry.py fails when the two disagree. A checkpoint whose architecture no row
claims falls back to the generic family when that can serve it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from transformers import AutoConfig

from services.common.errors import FailedPrecondition

if TYPE_CHECKING:
    from services.models.base import ModelFamily

# Hugging Face architecture -> (module in services/models/, class). The module's name is the
# family's name (`ModelFamily.name`).
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "Gemma3ForConditionalGeneration": ("gemma3", "Gemma3"),
    "Gemma4ForConditionalGeneration": ("gemma4", "Gemma4"),
    "Glm46VForConditionalGeneration": ("glm46v", "Glm46V"),
    "Glm4vForConditionalGeneration": ("glm4v", "Glm4v"),
    "Glm4vMoeForConditionalGeneration": ("glm4v_moe", "Glm4vMoe"),
    "GlmOcrForConditionalGeneration": ("glm_ocr", "GlmOcr"),
    "InternVLForConditionalGeneration": ("internvl", "InternVL"),
    "Llama4ForConditionalGeneration": ("llama4", "Llama4"),
    "LlavaForConditionalGeneration": ("llava", "Llava"),
    "LlavaNextForConditionalGeneration": ("llava_next", "LlavaNext"),
    "LlavaOnevisionForConditionalGeneration": ("llava_onevision", "LlavaOnevision"),
    "MllamaForConditionalGeneration": ("mllama", "Mllama"),
    "NemotronH_Omni_Reasoning_V3": ("nemotron_h_omni", "NemotronHOmni"),
    "PaliGemmaForConditionalGeneration": ("paligemma", "PaliGemma"),
    "Phi4MultimodalForCausalLM": ("phi4mm", "Phi4Multimodal"),
    "Qwen2AudioForConditionalGeneration": ("qwen2_audio", "Qwen2Audio"),
    "Qwen2_5OmniThinkerForConditionalGeneration": ("qwen2_5_omni_thinker", "Qwen2_5OmniThinker"),
    "PaddleOCRVLForConditionalGeneration": ("paddleocr_vl", "PaddleOcrVl"),
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VL"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VL"),
    "Qwen3_5ForConditionalGeneration": ("qwen3_5", "Qwen3_5"),
    "Qwen3_5MoeForConditionalGeneration": ("qwen3_5_moe", "Qwen3_5Moe"),
    "Qwen3VLForConditionalGeneration": ("qwen3_vl", "Qwen3VL"),
    "Qwen3VLMoeForConditionalGeneration": ("qwen3_vl_moe", "Qwen3VLMoe"),
}

# Claims no architecture: serves a checkpoint no row claims, when its `can_serve` says so.
GENERIC: tuple[str, str] = ("generic", "Generic")


@dataclass(frozen=True)
class FamilyStatus:
    """One family as `triptych models` lists it: its class, or why its module did not import."""

    name: str
    architectures: tuple[str, ...]  # empty for the generic family
    family: type[ModelFamily] | None  # None: unavailable
    error: str = ""  # why it is unavailable, e.g. "ImportError: cannot import name ..."

    @property
    def available(self) -> bool:
        return self.family is not None


def _class_names() -> dict[str, str]:
    """Family name -> class name, by name, generic last."""
    return {**dict(sorted(ARCHITECTURES.values())), GENERIC[0]: GENERIC[1]}


def family_names() -> list[str]:
    """Every family in the table, generic last; imports nothing."""
    return list(_class_names())


def _import(name: str) -> type[ModelFamily]:
    """The family class, importing its module now (Python keeps it in sys.modules after)."""
    module = importlib.import_module(f"{__package__}.{name}")
    return getattr(module, _class_names()[name])


def _import_error(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"


def load_family(name: str, model_dir: Path | None = None) -> type[ModelFamily]:
    """The family class named `name`; FAILED_PRECONDITION MODEL_FAMILY_UNAVAILABLE when its module
    does not import (any exception: a transformers change can surface as more than ImportError).
    `model_dir`: the checkpoint that needs it, for the message."""
    try:
        return _import(name)
    except Exception as err:  # reported with its type; the other families still serve
        needed_by = f"{model_dir}: " if model_dir is not None else ""
        raise FailedPrecondition(f"{needed_by}the {name} model family is unavailable: {_import_error(err)}",
                                 reason="MODEL_FAMILY_UNAVAILABLE", metadata={"family": name}) from err


def family_statuses() -> list[FamilyStatus]:
    """Every family with its class or its import error; imports every family module."""
    statuses = []
    for name in family_names():
        architectures = tuple(arch for arch, (module, _) in ARCHITECTURES.items() if module == name)
        try:
            statuses.append(FamilyStatus(name, architectures, _import(name)))
        except Exception as err:  # listed as unavailable with the reason
            statuses.append(FamilyStatus(name, architectures, None, _import_error(err)))
    return statuses


def family_for(model_dir: Path) -> ModelFamily:
    """The family serving a local checkpoint folder, from its config.json architectures."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FailedPrecondition(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json)",
                                 reason="MODEL_NOT_FOUND")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    for arch in architectures:
        if arch in ARCHITECTURES:
            family = load_family(ARCHITECTURES[arch][0], model_dir)(AutoConfig.from_pretrained(model_dir))
            if refusal := family.checkpoint_refusal():
                raise FailedPrecondition(f"{model_dir}: {refusal}", reason="MODEL_UNSUPPORTED")
            return family
    supported = ", ".join(sorted(ARCHITECTURES))
    try:
        generic = load_family(GENERIC[0])
    except FailedPrecondition as err:
        raise FailedPrecondition(f"{model_dir}: architectures {architectures} are not supported (supported: "
                                 f"{supported}; {err.message})", reason="MODEL_UNSUPPORTED") from err
    # The one call into the fallback's own test: a model it recognises but cannot serve exactly is
    # refused with its reason, never served with wrong tokens.
    verdict = generic.can_serve(model_dir)
    if verdict.serves:
        return generic(AutoConfig.from_pretrained(model_dir))
    if verdict.refusal:
        raise FailedPrecondition(verdict.refusal, reason="MODEL_UNSUPPORTED")
    raise FailedPrecondition(f"{model_dir}: architectures {architectures} are not supported (supported: {supported})",
                             reason="MODEL_UNSUPPORTED")
