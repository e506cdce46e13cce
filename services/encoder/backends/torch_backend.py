"""The towers in the encoder's own process, on its torch thread (towers.py)."""

from __future__ import annotations

import torch

from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.encoder.towers import load_towers, run_tower
from services.models.base import ItemEmbeddings
from services.models.checkpoint import Checkpoint


class TorchBackend:
    proto = encoder_pb2.ENCODER_BACKEND_TORCH
    workers = 1  # one thread owns torch
    health_interval_s = 0.0  # the towers are this process: ready while it runs

    def __init__(self, checkpoint: Checkpoint, device: str):
        self.family = checkpoint.family
        self.model = load_towers(checkpoint, device)

    def run(self, modality: str, items: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        return run_tower(self.family, self.model, modality, items)

    def ready(self) -> bool:
        return True

    def close(self) -> None:
        pass
