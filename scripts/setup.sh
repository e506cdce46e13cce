#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs Triptych with its test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import services, torch, torchvision, transformers, grpc, pytest, prometheus_client, opentelemetry.sdk, opentelemetry.instrumentation.grpc, opentelemetry.exporter.otlp.proto.grpc, cryptography, fastapi, uvicorn, openai, httpx, tritonclient.http, kubernetes_validate, hypothesis, num2words, timm" 2>/dev/null; then
  .venv/bin/pip install --quiet --upgrade pip
  # torch first, pinned: pip takes this build from the local wheel store on the project's machines.
  .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install --quiet -e ".[dev]"
fi
