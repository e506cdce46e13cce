"""Model families by Hugging Face architecture, and loading a checkpoint folder's family."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from services.common.errors import FailedPrecondition
from services.models.base import ModelFamily
from services.models.qwen2_vl import Qwen2VL

FAMILIES: tuple[type[ModelFamily], ...] = (Qwen2VL,)

_BY_ARCHITECTURE: dict[str, type[ModelFamily]] = {}
for _family in FAMILIES:
    for _arch in _family.hf_architectures:
        if _arch in _BY_ARCHITECTURE:
            raise RuntimeError(f"architecture {_arch} claimed by two families")
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
    supported = ", ".join(sorted(_BY_ARCHITECTURE))
    raise FailedPrecondition(f"{model_dir}: architectures {architectures} are not supported (supported: {supported})",
                             reason="MODEL_UNSUPPORTED")
