"""A checkpoint's towers, loaded and run the same way wherever they run: the encoder service, and the
processor's local encoder (services/processor/local_encoder.py) for items too small to send away.

Both hold the model without its language model, call the family's `encode` on items its schema
accepted, and sort a failure into out of memory (RESOURCE_EXHAUSTED) or a bug (INTERNAL): the
caller's inputs were checked, so what fails now is ours or the machine's.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.errors import Internal, ResourceExhausted, TriptychError
from services.common.tensors import to_proto
from services.models.base import ItemEmbeddings, ModelFamily
from services.models.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def load_towers(checkpoint: Checkpoint, device: str) -> PreTrainedModel:
    """The checkpoint's model in its dtype on `device`, language model dropped."""
    model = checkpoint.family.load_model(checkpoint.path, checkpoint.dtype, device)
    checkpoint.family.strip_for_encoder(model)
    return model


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err))


def run_tower(family: ModelFamily, model: PreTrainedModel, modality: str,
              batch: list[dict[str, torch.Tensor]]) -> list[ItemEmbeddings]:
    """The family's encode of checked items (call it on the torch thread); failures become statuses."""
    try:
        return family.encode(model, modality, batch)
    except TriptychError:
        raise
    except Exception as err:  # sorted into out-of-memory and internal
        if is_out_of_memory(err):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the failed batch's blocks back before the next request
            raise ResourceExhausted(f"the encoder ran out of memory encoding {len(batch)} {modality} items; "
                                    "retry later or send fewer or smaller items",
                                    reason="ENCODER_OUT_OF_MEMORY") from err
        log.exception("encoding %d %s items failed", len(batch), modality)
        raise Internal(f"encoding {len(batch)} {modality} items failed: {type(err).__name__}: {err}",
                       reason="ENCODER_FAILED") from err


def item_embeddings_proto(mm_hash: str, emb: ItemEmbeddings) -> encoder_pb2.ItemEmbeddings:
    """One item's embeddings as EncoderService answers them."""
    if emb.cross_attention:  # a cross-attention model's states (Mllama): their own field, no placeholder rows
        return encoder_pb2.ItemEmbeddings(mm_hash=mm_hash, cross_attention_states=to_proto(emb.embeddings))
    return encoder_pb2.ItemEmbeddings(mm_hash=mm_hash, embeddings=to_proto(emb.embeddings),
                                      deepstack_embeddings=[to_proto(d) for d in emb.deepstack],
                                      kept_token_indexes=[] if emb.kept is None else emb.kept.tolist())
