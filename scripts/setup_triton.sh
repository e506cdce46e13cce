#!/usr/bin/env bash
# A tritonserver that runs on this machine's CPU, for the Triton backend's tests and benchmark
# (DESIGN.md §4.5). It comes from the nvidia-pytriton 0.7.0 wheel (Triton 2.51), downloaded with pip
# and unpacked into build/triton -- never installed: pytriton's own dependencies (numpy<2, protobuf<6)
# do not fit the project's venv, and the server binary needs none of them.
#
# Writes build/triton/env (KEY=VALUE lines) that tests/encoder/triton_server.py reads:
#   TRITONSERVER        the server binary
#   TRITON_BACKEND_DIR  --backend-directory (python/ holds the Python backend and its 3.11 stub)
#   LD_LIBRARY_PATH     the wheel's bundled libraries, then the venv python's own lib dir: the stub links
#                       libpython3.11, and the system's (Debian 3.11.2) one fails with `_recursion_count`
#   PATH                the venv's bin first, so the stub's python imports the venv's numpy/torch
# Idempotent: a second run with everything in place only rewrites the env file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
VERSION=0.7.0
OUT=build/triton
ROOT="$OUT/wheel"
mkdir -p "$OUT"
if [ ! -x "$ROOT/pytriton/tritonserver/bin/tritonserver" ]; then
  "$PY" -m pip download --quiet "nvidia-pytriton==$VERSION" --no-deps --only-binary=:all: -d "$OUT"
  rm -rf "$ROOT"
  "$PY" -m zipfile -e "$OUT/nvidia_pytriton-$VERSION-"*.whl "$ROOT"
  chmod +x "$ROOT/pytriton/tritonserver/bin/tritonserver" \
           "$ROOT"/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub
fi
SERVER="$ROOT/pytriton/tritonserver"
PYVER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
STUB="$SERVER/python_backend_stubs/$PYVER/triton_python_backend_stub"
[ -f "$STUB" ] || { echo "setup_triton: the wheel has no Python backend stub for Python $PYVER" >&2; exit 1; }
BACKENDS="$OUT/backends"
mkdir -p "$BACKENDS/python"
cp -f "$SERVER/backends/python/libtriton_python.so" "$SERVER/backends/python/triton_python_backend_utils.py" \
      "$STUB" "$BACKENDS/python/"
LIBDIR=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
BIN=$(cd "$(dirname "$PY")" && pwd)
ABS=$(cd "$OUT" && pwd)
cat > "$OUT/env" <<EOF
TRITONSERVER=$ABS/wheel/pytriton/tritonserver/bin/tritonserver
TRITON_BACKEND_DIR=$ABS/backends
LD_LIBRARY_PATH=$ABS/wheel/nvidia_pytriton.libs:$LIBDIR
PATH=$BIN:/usr/local/bin:/usr/bin:/bin
EOF
echo "$OUT/env"
