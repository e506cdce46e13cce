"""The contract: buf lint clean, generated code fresh."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "services" / "common" / "api"


def test_buf_lint_clean():
    buf = shutil.which("buf") or str(Path(sys.executable).parent / "buf")
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_is_fresh(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), str(tmp_path)], check=True,
                   capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    committed = sorted(p.relative_to(API) for p in API.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert fresh == committed, "run `python scripts/gen_protos.py`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, API / p, shallow=False)]
    assert not stale, f"stale generated files {stale}: run `python scripts/gen_protos.py`"
