"""A local Hugging Face checkpoint folder: its family, its fingerprint, its ModelInfo.

All three services compute the fingerprint the same way from the folder, so two
services agree exactly when they load the same files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from services.common.api.triptych.common.v1 import model_info_pb2, tensor_pb2
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.tensors import wire_dtype
from services.models.base import AUDIO, IMAGE, VIDEO, ModelFamily
from services.models.registry import family_for

# Files that define the model's behaviour besides the weights.
_CONFIG_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken")
# Weight files up to this size are hashed whole; larger ones by header, size and
# sampled blocks, so a 16 GB checkpoint starts in seconds and a re-seeded tiny model still differs.
_FULL_HASH_BYTES = 64 << 20
_SAMPLE_BYTES = 1 << 20
_NUM_SAMPLES = 16


def _hash_file(digest: "hashlib._Hash", path: Path) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with path.open("rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return
        for i in range(_NUM_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BYTES) * i // (_NUM_SAMPLES - 1)))
            digest.update(f.read(_SAMPLE_BYTES))


def fingerprint(model_dir: Path) -> str:
    """sha256 over the folder's config, tokenizer, processor and weight files (16 hex digits)."""
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    for path in files:
        if path.suffix in _CONFIG_SUFFIXES or path.suffix in (".safetensors", ".bin"):
            _hash_file(digest, path)
    return digest.hexdigest()[:16]


_MODALITY = {IMAGE: tensor_pb2.MODALITY_IMAGE, VIDEO: tensor_pb2.MODALITY_VIDEO, AUDIO: tensor_pb2.MODALITY_AUDIO}
_MODALITY_NAME = {v: k for k, v in _MODALITY.items()}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def modality_to_proto(modality: str) -> int:
    return _MODALITY[modality]


def modality_from_proto(value: int) -> str:
    try:
        return _MODALITY_NAME[value]
    except KeyError:
        raise InvalidArgument(f"modality {value} is not image, video or audio", reason="MODALITY_INVALID") from None


class Checkpoint:
    """A checkpoint folder with its family and fingerprint; what GetModelInfo reports."""

    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        self.path = path
        self.dtype = dtype
        self.family: ModelFamily = family_for(path)
        self.fingerprint = fingerprint(path)

    def model_info(self) -> model_info_pb2.ModelInfo:
        family = self.family
        return model_info_pb2.ModelInfo(
            fingerprint=self.fingerprint,
            family=family.name,
            architecture=(family.config.architectures or [""])[0],
            modalities=[modality_to_proto(m) for m in family.modalities],
            hidden_size=family.hidden_size,
            embedding_dtype=wire_dtype(self.dtype),
            placeholder_tokens={m: family.placeholder_token(m) for m in family.modalities},
            max_context_tokens=family.max_context_tokens,
            model_path=str(self.path),
        )

    def check_fingerprint(self, expected: str) -> None:
        """A caller that names another model gets FAILED_PRECONDITION, never a wrong answer."""
        if expected and expected != self.fingerprint:
            raise FailedPrecondition(
                f"caller expects model {expected}, this service serves {self.fingerprint} ({self.path}); "
                "start all services with the same --model",
                reason="MODEL_FINGERPRINT_MISMATCH",
                metadata={"expected": expected, "served": self.fingerprint},
            )
