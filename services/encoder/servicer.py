"""EncoderService: processed media items in, one embedding set per item out."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig
from services.common.errors import InvalidArgument
from services.common.tensors import from_named, to_proto
from services.models.base import ItemEmbeddings
from services.models.checkpoint import Checkpoint, modality_from_proto

log = logging.getLogger(__name__)


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, checkpoint: Checkpoint, cfg: EncoderConfig):
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.cfg = cfg
        # One thread owns torch: the event loop only parses and serialises.
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-torch")
        self.model = self.family.load_model(checkpoint.path, checkpoint.dtype, cfg.device)
        self.family.strip_for_encoder(self.model)

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        self.checkpoint.check_fingerprint(request.model_fingerprint)
        if len(request.items) > self.cfg.max_items_per_request:
            raise InvalidArgument(
                f"{len(request.items)} items in one request; at most {self.cfg.max_items_per_request}",
                reason="TOO_MANY_ITEMS", metadata={"maxItemsPerRequest": str(self.cfg.max_items_per_request)})
        # Parse everything before touching torch: a bad item fails the request cleanly.
        by_modality: dict[str, list[int]] = {}
        inputs: list[dict[str, torch.Tensor]] = []
        for index, item in enumerate(request.items):
            modality = modality_from_proto(item.modality)
            if modality not in self.family.modalities:
                raise InvalidArgument(f"item {index}: this model does not take {modality}",
                                      reason="MODALITY_UNSUPPORTED")
            inputs.append(from_named(item.tensors))
            by_modality.setdefault(modality, []).append(index)
        loop = asyncio.get_running_loop()
        results: list[ItemEmbeddings | None] = [None] * len(inputs)
        for modality, indexes in by_modality.items():
            batch = [inputs[i] for i in indexes]
            out = await loop.run_in_executor(self._torch, self._encode, modality, batch)
            for i, emb in zip(indexes, out):
                results[i] = emb
        return encoder_pb2.EncodeResponse(items=[
            encoder_pb2.ItemEmbeddings(
                mm_hash=item.mm_hash,
                embeddings=to_proto(emb.embeddings),
                deepstack_embeddings=[to_proto(d) for d in emb.deepstack],
            )
            for item, emb in zip(request.items, results)
        ])

    def _encode(self, modality: str, batch: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        try:
            return self.family.encode(self.model, modality, batch)
        except (KeyError, ValueError, RuntimeError, IndexError) as err:
            # Malformed processor outputs (missing names, wrong shapes) surface here from torch.
            raise InvalidArgument(f"cannot encode {modality} items: {type(err).__name__}: {err}",
                                  reason="ENCODER_INPUT_INVALID") from err

    async def GetModelInfo(self, request, context) -> encoder_pb2.GetModelInfoResponse:
        return encoder_pb2.GetModelInfoResponse(model_info=self.checkpoint.model_info())
