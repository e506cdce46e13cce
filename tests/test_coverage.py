"""The coverage record (docs/coverage.json, docs/coverage.md) against the sweep that writes it (bench/coverage.py).

CI form (the full sweep proves parity for every served architecture and takes tens of minutes): every
architecture's tiny checkpoint is built into build/coverage-models once per run and its serving path
resolved as the services resolve it, which must be the recorded one (the refusal reason included);
parity through the three services is proven again for PARITY_IN_CI architectures served by the
generic family that no other test covers. The served count may never fall below docs/coverage-floor.txt.
TRIPTYCH_COVERAGE_FULL=1 proves parity for every served architecture (the whole sweep, as recorded).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from services.coverage import RESULTS_MD, SERVED_FLOOR_FILE, load, markdown

ROOT = Path(__file__).resolve().parent.parent

# Generic-served architectures proven again in CI: those tests/e2e/test_generic_parity.py does not cover,
# at most this many (each costs ~10 s on the 2-core CI machine: all of them today).
PARITY_IN_CI = 9
_COVERED_ELSEWHERE = {"idefics3", "aya_vision", "mistral3", "llava_next_video"}


@pytest.fixture(scope="module")
def recorded():
    coverage = load()
    assert coverage is not None, "docs/coverage.json is missing: run python bench/coverage.py"
    return coverage


def test_every_architecture_of_the_mapping_is_recorded(recorded):
    assert [r.model_type for r in recorded.rows] == list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    assert [r.architecture for r in recorded.rows] == list(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())


def test_served_count_never_falls_below_the_floor(recorded):
    floor = int(SERVED_FLOOR_FILE.read_text().split()[0])
    assert recorded.counts()["served"] >= floor


def test_every_unserved_architecture_has_a_specific_reason(recorded):
    for row in recorded.rows:
        if not row.served:
            assert row.reason and "unknown" not in row.reason.lower(), row


def test_the_markdown_is_the_record(recorded):
    assert RESULTS_MD.read_text() == markdown(recorded), "docs/coverage.md is stale: run python bench/coverage.py"


def test_the_sweep_reproduces_the_record(recorded):
    """Each architecture resolves to its recorded path (or refusal) again; a few are proven exact again."""
    # bench/coverage.py by path, under a name of its own ("coverage" is also coverage.py's package)
    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "bench" / "coverage.py")
    sweep = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = sweep  # its dataclasses look their module up there
    spec.loader.exec_module(sweep)

    full = os.environ.get("TRIPTYCH_COVERAGE_FULL") == "1"
    generic = [r.model_type for r in recorded.rows if r.served and r.path == "generic"
               and r.model_type not in _COVERED_ELSEWHERE]
    parity_for = frozenset(r.model_type for r in recorded.rows if r.served) if full else frozenset(generic[:PARITY_IN_CI])
    assert sweep.differences(recorded, ROOT / "build" / "coverage-models", parity_for) == []
