# Triton Inference Server (NGC, GPUs) that can run `triptych export-triton` repositories: the Python
# backend's model.py imports torch, transformers and the family code, all of which need Python 3.11,
# while the NGC image's Python backend stub is built for its own 3.10. So: Python 3.11 with Triptych's
# dependencies in /opt/triptych, and the stub replaced by the 3.11 build of the same Triton (2.51) from
# the nvidia-pytriton 0.7.0 wheel -- the recipe the tests run on a CPU (scripts/setup_triton.sh).
FROM nvcr.io/nvidia/tritonserver:24.10-py3
RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/triptych \
    && /opt/triptych/bin/pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1
WORKDIR /opt/triptych/src
COPY pyproject.toml README.md ./
COPY services ./services
RUN /opt/triptych/bin/pip install --no-cache-dir .
RUN /opt/triptych/bin/pip download --no-deps --only-binary=:all: -d /tmp/pytriton nvidia-pytriton==0.7.0 \
    && /opt/triptych/bin/python -m zipfile -e /tmp/pytriton/nvidia_pytriton-0.7.0-*.whl /tmp/pytriton/wheel \
    && install -m 755 /tmp/pytriton/wheel/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub \
       /opt/tritonserver/backends/python/triton_python_backend_stub \
    && rm -rf /tmp/pytriton
# The stub's python finds the venv's packages (numpy, torch) through PATH (DESIGN.md §4.5).
ENV PATH=/opt/triptych/bin:$PATH HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
WORKDIR /
