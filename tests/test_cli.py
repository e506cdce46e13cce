from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_models_lists_every_family_file():
    out = subprocess.run([sys.executable, "-m", "services.cli", "models", "--json"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    rows = {row["family"]: row for row in json.loads(out.stdout)}
    not_families = {"__init__", "base", "registry", "checkpoint", "generic", "inputs"}
    family_files = {p.stem for p in (ROOT / "services" / "models").glob("*.py")} - not_families
    for name in family_files:
        assert rows[name]["served_by"] == f"services/models/{name}.py"
        assert "image" in rows[name]["modalities"]
    assert rows["qwen2_vl"]["architectures"] == ["Qwen2VLForConditionalGeneration"]


def test_make_model_writes_a_loadable_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "services.cli", "make-model", "--family", "qwen2_vl", "--out",
                          str(tmp_path / "m"), "--seed", "3"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
