#!/usr/bin/env bash
# Sets everything up and runs the whole test suite (unit + services as separate processes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/setup_codegen.sh  # Go and TypeScript generators for buf.gen.yaml (tests/test_protos.py)
scripts/setup_triton.sh  # tritonserver from the nvidia-pytriton wheel, into build/triton (tests/encoder/test_triton*)
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
