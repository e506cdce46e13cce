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
