"""The processor's own encoder, for items too small to be worth a trip to the encoder service.

A split deployment pays for every item: its pixel tensors cross to the encoder, its embeddings
cross back, and it waits in the encoder's queue. For a small image that can cost more than the
tower itself (DESIGN §5: "skip the split for tiny requests"). With --local-encode-max-patches N
the processor loads the towers (as the encoder service does, services/encoder/towers.py) and
encodes each item of at most N patches (tower input rows) itself; larger ones still go to the
encoder service. Off (0) by default: bench/local_encoder.py measures when it pays.

Its torch runs on one dedicated thread, never on the event loop, and on one torch CPU thread:
the processor is the host's third torch process (`triptych up` gives the encoder and the LLM the
cores), and an item small enough to stay here gains little from more.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.encoder.towers import item_embeddings_proto, load_towers, run_tower
from services.models import evs
from services.models.base import ModelFamily, ProcessedItem
from services.models.checkpoint import Checkpoint
from services.models.inputs import evaluate

log = logging.getLogger(__name__)

LOCAL_TORCH_THREADS = 1


def item_patches(family: ModelFamily, item: ProcessedItem) -> int:
    """The item's tower input rows as its family's schema counts them (Qwen: t*h*w; tiles x patches per
    tile), as the encoder's --max-item-patches does; its placeholder tokens where the schema has no count."""
    schema = family.encoder_schema(item.modality)
    if not schema.patches:
        return item.length
    bindings = family.check_encoder_item(item.modality, item.encoder_inputs, where="local item")
    return evaluate(schema.patches, bindings)


class LocalEncoder:
    def __init__(self, checkpoint: Checkpoint, max_patches: int):
        self.family = checkpoint.family
        self.max_patches = max_patches
        torch.set_num_threads(LOCAL_TORCH_THREADS)  # process-wide: the preprocess threads' resizing too
        self.model = load_towers(checkpoint, "cpu")  # the processor's host: it has no accelerator of its own
        self._torch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-encoder")
        self.num_items_encoded = 0  # items this process encoded itself (tests, logs)
        log.info("local encoder: items of at most %d patches are encoded in the processor", max_patches)

    def close(self) -> None:
        self._torch.shutdown(wait=False)

    def patches(self, item: ProcessedItem) -> int:
        return item_patches(self.family, item)

    def select(self, items: dict[str, ProcessedItem]) -> frozenset[str]:
        """The mm_hashes of the items small enough to encode here (reads shapes only)."""
        return frozenset(h for h, item in items.items() if self.patches(item) <= self.max_patches)

    def start(self, items: dict[str, ProcessedItem], hashes: frozenset[str]) -> asyncio.Future:
        """Encodes the items named by `hashes` on the local torch thread; the future gives mm_hash -> their
        embeddings as the encoder service answers them. A failure the caller never awaits (its other
        encode failed first) is retrieved here, so it is not reported again as unhandled."""
        chosen = {h: items[h] for h in hashes}
        context = contextvars.copy_context()  # the request id in the tower's log lines
        future = asyncio.get_running_loop().run_in_executor(self._torch, context.run, self._encode, chosen)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    def _encode(self, items: dict[str, ProcessedItem]) -> dict[str, encoder_pb2.ItemEmbeddings]:
        """One tower call per modality, as the encoder service does (local torch thread)."""
        by_modality: dict[str, list[str]] = {}
        for h, item in items.items():
            by_modality.setdefault(item.modality, []).append(h)
        out: dict[str, encoder_pb2.ItemEmbeddings] = {}
        for modality, hashes in by_modality.items():
            results = run_tower(self.family, self.model, modality, [items[h].encoder_inputs for h in hashes])
            for h, emb in zip(hashes, results, strict=True):
                pruning = items[h].pruning  # EVS as the encoder service does it, after the tower
                out[h] = item_embeddings_proto(h, evs.prune(emb, pruning.frames, pruning.rate) if pruning else emb)
        self.num_items_encoded += len(items)
        return out
