"""Every tiny builder writes the same bytes for the same seed, in any process: pinned digests.

digests.json holds, per "family/size/seed", a sha256 over the built folder (sorted relative paths
and each file's sha256). They were recorded from the builders at commit ff95314 (then in
services/models/tiny/, before the move to services/tiny_checkpoints/ and the sharing of their
code), with pyproject's torch and transformers pins. A change to a builder's output fails here and
must be deliberate: then rewrite the pins with
`python -m tests.tiny_checkpoints.test_builders > tests/tiny_checkpoints/digests.json`
and say why in the commit.

The rebuild runs in another process with another hash seed, so nothing may depend on set or dict
order; seed 1 pins that another seed gives other files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from services.tiny_checkpoints import SIZES, TINY_FAMILIES, make_model

REPO_ROOT = Path(__file__).resolve().parents[2]
DIGESTS = Path(__file__).with_name("digests.json")
PINNED: dict[str, str] = json.loads(DIGESTS.read_text())
# (size, seed) pairs built per family: both sizes at seed 0, and the tiny size at seed 1.
BUILDS = (*((size, 0) for size in SIZES), ("tiny", 1))


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def build_digests() -> dict[str, str]:
    """Build every family at every (size, seed) of BUILDS; "family/size/seed" -> folder digest."""
    digests = {}
    with tempfile.TemporaryDirectory() as scratch:
        for family in TINY_FAMILIES:
            for size, seed in BUILDS:
                out = make_model(family, Path(scratch) / f"{family}-{size}-{seed}", seed=seed, size=size)
                digests[f"{family}/{size}/{seed}"] = folder_digest(out)
    return digests


@pytest.fixture(scope="module")
def rebuilt() -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": "123", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tests.tiny_checkpoints.test_builders"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_every_builder_is_pinned():
    assert sorted(PINNED) == sorted(f"{f}/{size}/{seed}" for f in TINY_FAMILIES for size, seed in BUILDS)


@pytest.mark.parametrize("key", sorted(PINNED))
def test_build_is_byte_identical_to_the_pinned_one(rebuilt, key):
    assert rebuilt[key] == PINNED[key], f"{key}: the builder's output changed"


if __name__ == "__main__":
    print(json.dumps(build_digests(), indent=1, sort_keys=True))
