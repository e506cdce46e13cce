"""Where the encoder's towers run: in this process (torch) or in a Triton Inference Server (triton).

The servicer keeps what is the encoder's own in front of either -- schema checks, the embedding
cache, single flight, the batcher's queue -- and the batcher's threads hand each forward's checked
items to the backend's `run`. A backend answers one ItemEmbeddings per item and fails with a
TriptychError status (RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE).
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers import PreTrainedModel

from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.config import EncoderConfig
from services.models.base import ItemEmbeddings
from services.models.checkpoint import Checkpoint


class TowerBackend(Protocol):
    """Runs a checkpoint's towers on checked items."""

    # What GetModelInfo reports.
    proto: encoder_pb2.EncoderBackend.ValueType
    # Batcher threads that call `run` at once: one for torch (one thread owns torch), several for Triton
    # (each a request in flight, so that Triton's dynamic batcher sees concurrent requests).
    workers: int
    # The towers when they are in this process (torch), else None.
    model: PreTrainedModel | None
    # Seconds between `ready` checks that the encoder's health follows; 0: nothing to follow (torch).
    health_interval_s: float

    def run(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        """The embeddings of items the tower encodes as one forward, one per item."""

    def ready(self) -> bool:
        """Whether the towers can run now (blocking; called off the event loop)."""

    def close(self) -> None:
        """Frees what the backend holds (connections, shared memory)."""


def open_backend(checkpoint: Checkpoint, cfg: EncoderConfig) -> TowerBackend:
    """The configured backend, ready: the towers loaded, or Triton's models checked."""
    if cfg.backend == "triton":
        from services.encoder.backends.triton_backend import TritonBackend

        return TritonBackend(checkpoint, cfg)
    from services.encoder.backends.torch_backend import TorchBackend

    return TorchBackend(checkpoint, cfg.device)
