"""EncoderService: processed media items in, one embedding set per item out.

An Encode runs in three steps, none on the event loop: parse and check every item against the
family's schema (a parse thread: proto -> tensors, shapes and per-item budget; a bad item fails the
request before torch sees any), run the towers (the one torch thread), build the reply (the torch
thread, tensors -> proto).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from services.common import chunks, shm
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.config import EncoderConfig, torch_threads
from services.common.errors import InvalidArgument
from services.common.tensors import from_named, to_proto
from services.encoder.towers import load_towers, run_tower
from services.models.base import ItemEmbeddings
from services.models.checkpoint import Checkpoint, modality_from_proto

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParsedRequest:
    """An EncodeRequest whose items all fit the family's schema: item indexes by modality, tensors per item."""

    by_modality: dict[str, list[int]]
    inputs: list[dict[str, torch.Tensor]]


class EncoderServicer(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, checkpoint: Checkpoint, cfg: EncoderConfig):
        self.checkpoint = checkpoint
        self.family = checkpoint.family
        self.cfg = cfg
        # The process's share of the cores (the LLM's engine process has its own): not torch's all-cores default.
        torch.set_num_threads(torch_threads(cfg.torch_threads))
        # One thread owns torch; parsing (the bulk of a large request's bytes) runs beside it.
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encoder-torch")
        self._parse_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encoder-parse")
        self.model = load_towers(checkpoint, cfg.device)
        self._shm = shm.Exporter(ttl_s=cfg.shm_ttl_s, max_bytes=cfg.shm_max_mib << 20)

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        loop = asyncio.get_running_loop()
        parsed = await loop.run_in_executor(self._parse_pool, self._parse, request)
        response = await loop.run_in_executor(self._torch, self._encode, request, parsed)
        if request.embeddings_transport == encoder_pb2.EMBEDDINGS_TRANSPORT_SHARED_MEMORY and self._shm.enabled:
            tensors = [t for _, t in chunks.item_tensors(response.items)]
            await loop.run_in_executor(self._parse_pool, self._shm.export, tensors)  # inline when full
        return response

    async def StreamEncode(self, request: encoder_pb2.StreamEncodeRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[encoder_pb2.StreamEncodeResponse]:
        response = await self.Encode(request.request, context)
        own = chunks.chunk_budget(self.cfg.server.max_message_mib << 20)
        budget = min(request.max_chunk_bytes, own) if request.max_chunk_bytes > 0 else own
        messages = await asyncio.get_running_loop().run_in_executor(
            self._parse_pool, chunks.split_encode_response, response, max(budget, chunks.MIN_CHUNK_BYTES))
        for message in messages:
            yield message

    def close(self) -> None:
        """Frees the shared-memory regions still waiting for their reader."""
        self._shm.close()

    async def GetModelInfo(self, request, context) -> encoder_pb2.GetModelInfoResponse:
        return encoder_pb2.GetModelInfoResponse(model_info=self.checkpoint.model_info())

    def _parse(self, request: encoder_pb2.EncodeRequest) -> ParsedRequest:
        """Tensors of every item, each checked against the schema and the per-item budget (no torch)."""
        self.checkpoint.check_fingerprint(request.model_fingerprint)
        if len(request.items) > self.cfg.max_items_per_request:
            raise InvalidArgument(
                f"{len(request.items)} items in one request; at most {self.cfg.max_items_per_request}",
                reason="TOO_MANY_ITEMS", metadata={"maxItemsPerRequest": str(self.cfg.max_items_per_request)})
        by_modality: dict[str, list[int]] = {}
        inputs: list[dict[str, torch.Tensor]] = []
        for index, item in enumerate(request.items):
            where = f"items[{index}]"
            modality = modality_from_proto(item.modality)
            if modality not in self.family.modalities:
                raise InvalidArgument(f"{where}: this model does not take {modality}", reason="MODALITY_UNSUPPORTED")
            tensors = from_named(item.tensors)
            self.family.check_encoder_item(modality, tensors, where=f"{where}.tensors",
                                           max_patches=self.cfg.max_item_patches)
            inputs.append(tensors)
            by_modality.setdefault(modality, []).append(index)
        return ParsedRequest(by_modality, inputs)

    def _encode(self, request: encoder_pb2.EncodeRequest, parsed: ParsedRequest) -> encoder_pb2.EncodeResponse:
        """Runs the towers, one call per modality, and builds the reply (torch thread)."""
        results: list[ItemEmbeddings | None] = [None] * len(parsed.inputs)
        for modality, indexes in parsed.by_modality.items():
            out = self._run_tower(modality, [parsed.inputs[i] for i in indexes])
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

    def _run_tower(self, modality: str, batch: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
        """The family's encode; the caller's inputs were checked, so what fails now is ours or the machine's."""
        return run_tower(self.family, self.model, modality, batch)
