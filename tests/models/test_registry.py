"""The registry: a static architecture table, family modules imported lazily, broken ones reported."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import services.models
from services.cli import main as cli_main
from services.common.errors import FailedPrecondition
from services.models import registry
from services.models.base import ModelFamily
from services.tiny_checkpoints import TINY_FAMILIES
from tests.checkpoints import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = ROOT / "services" / "models"
# A module whose import fails as a family's does when the installed transformers lacks a name it imports.
BROKEN_SOURCE = "from transformers import Qwen3VLModelOfAnotherVersion\n"


def _family_classes() -> dict[str, type[ModelFamily]]:
    """Every concrete ModelFamily subclass defined in a module of services/models/, by module name."""
    classes = {}
    for path in sorted(MODELS_DIR.glob("[!_]*.py")):
        module = importlib.import_module(f"services.models.{path.stem}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, ModelFamily) and cls.__module__ == module.__name__ and not inspect.isabstract(cls):
                assert path.stem not in classes, f"{path.stem} defines two families"
                classes[path.stem] = cls
    return classes


@pytest.fixture
def broken_family(tmp_path, monkeypatch) -> str:
    """Points qwen3_vl's table row at a module (found through services.models' search path) whose
    import raises ImportError; returns the family name that row now gives."""
    name = "broken_qwen3_vl"
    (tmp_path / f"{name}.py").write_text(BROKEN_SOURCE)
    monkeypatch.setattr(services.models, "__path__", [*services.models.__path__, str(tmp_path)])
    monkeypatch.setitem(registry.ARCHITECTURES, "Qwen3VLForConditionalGeneration", (name, "Qwen3VL"))
    return name


def test_importing_the_registry_imports_no_family():
    code = "import json, sys, services.models.registry; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout))
    family_modules = {f"services.models.{name}" for name in registry.family_names()}
    assert not family_modules & loaded, sorted(family_modules & loaded)
    assert "services.models.base" not in loaded


def test_table_agrees_with_the_family_classes():
    """A family file without its rows, a row naming the wrong class, or a family whose `name` is not
    its module's name fails here."""
    classes = _family_classes()
    for module, cls in classes.items():
        assert cls.name == module, f"{cls.__name__}.name is {cls.name!r} but its module is {module}"
    expected = {arch: (module, cls.__name__) for module, cls in classes.items() for arch in cls.hf_architectures}
    assert registry.ARCHITECTURES == expected
    assert [(module, cls.__name__) for module, cls in classes.items() if not cls.hf_architectures] == [registry.GENERIC]


def test_every_family_imports_and_is_available():
    statuses = registry.family_statuses()
    assert [s.name for s in statuses] == registry.family_names()
    for status in statuses:
        assert status.available, status.error
        assert status.family.name == status.name
        assert status.architectures == status.family.hf_architectures


def test_family_for_a_tiny_checkpoint():
    family = registry.family_for(tiny_checkpoint("qwen2_vl"))
    assert family.name == "qwen2_vl"
    assert family.config.architectures == ["Qwen2VLForConditionalGeneration"]


def test_architecture_without_a_family_file_goes_to_generic():
    assert registry.family_for(tiny_checkpoint("idefics3")).name == "generic"


def test_broken_family_is_unavailable_and_the_others_serve(broken_family):
    statuses = {status.name: status for status in registry.family_statuses()}
    broken = statuses.pop(broken_family)
    assert not broken.available
    assert broken.error.startswith("ImportError: cannot import name 'Qwen3VLModelOfAnotherVersion'")
    assert all(status.available for status in statuses.values())
    assert registry.family_for(tiny_checkpoint("qwen2_vl")).name == "qwen2_vl"

    with pytest.raises(FailedPrecondition) as err:
        registry.family_for(tiny_checkpoint("qwen3_vl"))
    assert err.value.reason == "MODEL_FAMILY_UNAVAILABLE"
    assert err.value.message.startswith(f"{tiny_checkpoint('qwen3_vl')}: the {broken_family} model family is unavailable")
    assert err.value.metadata == {"family": broken_family}
    assert "ImportError: cannot import name 'Qwen3VLModelOfAnotherVersion'" in err.value.message


def test_models_command_lists_a_broken_family_with_its_reason(broken_family, capsys):
    assert cli_main(["models", "--json"]) == 0
    rows = {row["family"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[broken_family]["available"] is False
    assert "Qwen3VLModelOfAnotherVersion" in rows[broken_family]["unavailable_reason"]
    assert rows[broken_family]["modalities"] == []  # unknown: the class did not import
    assert rows["qwen2_vl"]["available"] is True and rows["qwen2_vl"]["unavailable_reason"] is None

    assert cli_main(["models"]) == 0
    text = capsys.readouterr().out
    assert re.search(rf"^{broken_family} .*\n\s+unavailable: ImportError: cannot import name", text, re.M), text


def test_unknown_architecture_is_unsupported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(FailedPrecondition) as err:
        registry.family_for(tmp_path)
    assert err.value.reason == "MODEL_UNSUPPORTED"
    assert "LlamaForCausalLM" in err.value.message and "Qwen2VLForConditionalGeneration" in err.value.message


def test_unknown_architecture_with_the_generic_family_broken(tmp_path, monkeypatch):
    (tmp_path / "broken_generic.py").write_text(BROKEN_SOURCE)
    monkeypatch.setattr(services.models, "__path__", [*services.models.__path__, str(tmp_path)])
    monkeypatch.setattr(registry, "GENERIC", ("broken_generic", "Generic"))
    with pytest.raises(FailedPrecondition) as err:
        registry.family_for(tiny_checkpoint("idefics3"))
    assert err.value.reason == "MODEL_UNSUPPORTED"
    assert "the broken_generic model family is unavailable: ImportError" in err.value.message


def test_folder_without_config_is_not_found(tmp_path):
    with pytest.raises(FailedPrecondition) as err:
        registry.family_for(tmp_path)
    assert err.value.reason == "MODEL_NOT_FOUND"


def test_models_command_matches_the_registry():
    out = subprocess.run([sys.executable, "-m", "services.cli", "models", "--json"], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    rows = json.loads(out.stdout)
    generic_served = [name for name in TINY_FAMILIES if name not in registry.family_names()]
    assert [row["family"] for row in rows] == [*registry.family_names(), *generic_served]
    for row in rows:
        assert row["available"] and row["unavailable_reason"] is None
        assert row["tiny_model"] == (row["family"] in TINY_FAMILIES)
    classes = _family_classes()
    for row in rows:
        cls = classes.get(row["family"], classes["generic"])
        own = row["family"] in classes  # else a tiny builder's model type, served generically
        assert row["modalities"] == ["text", *(cls.modalities if own else cls.model_type_modalities(row["family"]))]
        if cls.hf_architectures:
            assert row["architectures"] == list(cls.hf_architectures)
            assert row["served_by"] == f"services/models/{row['family']}.py"
        else:
            assert row["served_by"] == "generic path (services/models/generic.py)"


def test_readme_families_table_names_every_family():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Model families", 1)[1].split("\n## ", 1)[0]
    first_cells = [line.split("|")[1] for line in section.splitlines() if line.startswith("| ")]
    listed = {name.strip(" `") for cell in first_cells[1:] for name in cell.split(",")}  # [0] is the header
    assert listed == {*registry.family_names(), *TINY_FAMILIES}
