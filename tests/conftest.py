"""Shared fixtures: tiny checkpoints built once per run, services started as real processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.checkpoints import tiny_checkpoint
from tests.procs import ServiceSet, start_services

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def qwen2_vl_dir() -> Path:
    return tiny_checkpoint("qwen2_vl")


@pytest.fixture(scope="session")
def qwen2_vl_other_dir() -> Path:
    """Same family, another seed: another fingerprint."""
    return tiny_checkpoint("qwen2_vl", seed=1)


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def qwen2_vl_services(qwen2_vl_dir, media_dir):
    """Encoder, LLM and processor as three separate processes, shared by the family's tests."""
    services: ServiceSet = start_services(qwen2_vl_dir, allowed_media_dir=media_dir)
    yield services
    services.stop()
