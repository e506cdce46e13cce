"""Tiny checkpoints for tests, built once per run into build/test-models (or $TRIPTYCH_TEST_MODELS)."""

from __future__ import annotations

import os
from pathlib import Path

MODELS_DIR = Path(os.environ.get("TRIPTYCH_TEST_MODELS",
                                 Path(__file__).resolve().parent.parent / "build" / "test-models"))


def tiny_checkpoint(family: str, seed: int = 0) -> Path:
    out = MODELS_DIR / f"{family}-seed{seed}"
    if not (out / "config.json").exists():
        from services.tiny_checkpoints import make_model

        make_model(family, out, seed=seed)
    return out


def scaled_deepstack(src: Path, dst: Path, scale: float) -> Path:
    """A copy of a Qwen3-VL checkpoint whose deepstack mergers' last linear (weight and bias) is multiplied
    by `scale`. With random weights deepstack barely moves the logits (DESIGN 4.3): x30 makes it matter."""
    import shutil

    import torch
    from transformers import AutoModelForImageTextToText

    shutil.copytree(src, dst)
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.mul_(scale)
            merger.linear_fc2.bias.mul_(scale)
    model.save_pretrained(dst)
    return dst
