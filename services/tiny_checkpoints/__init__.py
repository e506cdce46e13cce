"""Tiny random Hugging Face checkpoints, built offline, for tests and benchmarks.

`make_model(family, out_dir, seed, size)` writes a complete checkpoint folder (config, random
safetensors weights, generation config, a trained byte-level BPE tokenizer, the family's real chat
template and its processor config) that the family's transformers Auto classes load with no
network. The same seed gives byte-identical files; another seed gives other weights.

Weights are re-drawn after construction (DESIGN 4.3a): at the stock `initializer_range=0.02` every
prompt decodes to one repeated token and images change nothing, so a parity test on such a model
proves nothing. Each family's builder scales its layers so that greedy outputs vary with the prompt
and with the image.

To add a family: a module in this package with `FAMILY = "<name>"` and `build(ctx: BuildContext)`
that saves model + processor into `ctx.out_dir`, from the pieces in common.py (size presets, the
tokenizer and its special ids, the config keys every family sets alike, weight re-draws, saving).
Modules are found by name; nothing to register. tests/tiny_checkpoints/digests.json pins what each
builder writes, so a new one adds its digests there.

Not a model family: services/models/ serves checkpoints, whatever built them; this package only
writes them (`triptych make-model`, the demo's default model, the tests' checkpoints).
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from services.tiny_checkpoints.common import SIZES, BuildContext


def _builders() -> dict[str, Callable[[BuildContext], None]]:
    builders: dict[str, Callable[[BuildContext], None]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in ("common", "auto"):  # shared pieces; auto.py builds any model type (the coverage sweep)
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if module.FAMILY in builders:
            raise RuntimeError(f"two tiny builders for family {module.FAMILY}")
        builders[module.FAMILY] = module.build
    return builders


_BUILDERS = _builders()
TINY_FAMILIES: tuple[str, ...] = tuple(sorted(_BUILDERS))


def make_model(family: str, out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Build a random checkpoint of `family` into `out_dir` and return its path.

    The folder is written in a scratch folder beside it and moved in file by file, config.json
    last, so a reader that checks for config.json never sees a half-written checkpoint.
    Existing files of the same names are replaced.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(TINY_FAMILIES)})")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (known: {', '.join(SIZES)})")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _BUILDERS[family](BuildContext(out_dir=scratch, seed=seed, size=size))
        out.mkdir(exist_ok=True)
        files = sorted(scratch.iterdir(), key=lambda f: (f.name == "config.json", f.name))
        for f in files:
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


__all__ = ["SIZES", "TINY_FAMILIES", "BuildContext", "make_model"]
