"""Model families by Hugging Face architecture, and the family of a checkpoint folder.

Every module in services/models/ that defines a ModelFamily subclass with `hf_architectures`
is a family: adding one is adding its file (like vLLM's model registry, but found by scanning).
A checkpoint whose architecture no family claims falls back to the generic family when that can
serve it.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from pathlib import Path

from transformers import AutoConfig

import services.models as models_package
from services.common.errors import FailedPrecondition
from services.models.base import ModelFamily

_NOT_FAMILIES = frozenset({"base", "registry", "checkpoint", "tiny"})


def _discover() -> dict[str, type[ModelFamily]]:
    families: dict[str, type[ModelFamily]] = {}
    for info in pkgutil.iter_modules(models_package.__path__):
        if info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"{models_package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ModelFamily) and cls.__module__ == module.__name__ and not inspect.isabstract(cls):
                if cls.name in families:
                    raise RuntimeError(f"two families named {cls.name}")
                families[cls.name] = cls
    return families


FAMILIES: dict[str, type[ModelFamily]] = _discover()

_BY_ARCHITECTURE: dict[str, type[ModelFamily]] = {}
for _family in FAMILIES.values():
    for _arch in _family.hf_architectures:
        if _arch in _BY_ARCHITECTURE:
            raise RuntimeError(f"architecture {_arch} claimed by {_BY_ARCHITECTURE[_arch].name} and {_family.name}")
        _BY_ARCHITECTURE[_arch] = _family


def family_for(model_dir: Path) -> ModelFamily:
    """The family serving a local checkpoint folder, from its config.json architectures."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FailedPrecondition(f"{model_dir} is not a Hugging Face checkpoint folder (no config.json)",
                                 reason="MODEL_NOT_FOUND")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    for arch in architectures:
        if arch in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[arch](AutoConfig.from_pretrained(model_dir))
    fallback = FAMILIES.get("generic")
    if fallback is not None and fallback.can_serve(model_dir):
        return fallback(AutoConfig.from_pretrained(model_dir))
    supported = ", ".join(sorted(_BY_ARCHITECTURE))
    raise FailedPrecondition(f"{model_dir}: architectures {architectures} are not supported (supported: {supported})",
                             reason="MODEL_UNSUPPORTED")
