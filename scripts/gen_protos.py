"""Generates the Python code for protos/ into services/common/api/.

The one way generated code is produced: `python scripts/gen_protos.py [OUT_DIR]`.
tests/test_protos.py regenerates into a temporary folder and fails when the
committed files differ.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "services" / "common" / "api"
# protoc writes `from triptych.x.v1 import y_pb2`; our package lives under services.common.api.
IMPORT_PREFIX = "services.common.api."


def _plugin(name: str) -> str:
    path = Path(sysconfig.get_path("scripts")) / name
    if not path.exists():
        path = Path(sys.executable).parent / name
    return f"--plugin={name}={path}"


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if out_dir.exists():
        shutil.rmtree(out_dir / "triptych", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    grpc_include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{grpc_include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        _plugin("protoc-gen-mypy"),
        f"--mypy_out={out_dir}",
        _plugin("protoc-gen-mypy_grpc"),
        f"--mypy_grpc_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in (out_dir / "triptych").rglob("*") if p.is_file())
    for path in generated:
        text = path.read_text()
        text = re.sub(r"^(from|import) triptych\.", rf"\1 {IMPORT_PREFIX}triptych.", text, flags=re.M)
        path.write_text(text)
    for folder in [out_dir, *(p for p in (out_dir / "triptych").rglob("*") if p.is_dir()), out_dir / "triptych"]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text("")
    return generated


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for path in generate(out):
        print(path.relative_to(out))
