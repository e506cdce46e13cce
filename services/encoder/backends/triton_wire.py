"""How a unit of items travels to a Triton model and its embeddings back (both sides import this).

One Triton request carries one unit: the items the encoder's torch backend would encode in one
`family.encode` call (one item; or a batch-dependent family's group; or what --batching put in one
forward). Items of one modality carry the same named tensors (the family's encoder_schema) but of
different sizes (Qwen patches, InternVL tiles, Phi-4-MM crops), so each schema tensor goes as the
items' tensors flattened to `[rows, *fixed]` and concatenated, `fixed` being the schema's trailing
fixed dims, with a `<name>__shape` tensor holding every item's own shape to cut them apart. Config
dims stay typed (`[-1, 1176]`, `[-1, 3, 896, 896]`) and no item is padded, so the tower sees each
item's tensors exactly as the torch backend does and the embedding bytes are the same.

Floating tensors travel as FP32 and integer ones as INT64: every dtype a processor makes (fp32,
bf16, fp16; int32, int64) widens to those exactly, and the family casts to the model's dtype as it
does for the torch backend. Embeddings come back in the model's dtype, items concatenated by rows.
Every tensor has Triton's leading batch dim of 1 (max_batch_size > 0, ragged batching: triton_export.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from services.models.base import ItemEmbeddings
from services.models.inputs import FLOAT, ItemSchema, TensorSpec

EMBEDDINGS = "EMBEDDINGS"  # [1, rows of all items, hidden], the model's dtype
EMBEDDING_ROWS = "EMBEDDING_ROWS"  # [1, items] INT64: each item's rows
DEEPSTACK = "DEEPSTACK"  # [1, layers, rows of all items, hidden]; only for a family with deepstack layers
SHAPE_SUFFIX = "__shape"

# torch dtype <-> Triton's config type and KServe v2 datatype
TRITON_TYPES = {torch.float32: ("TYPE_FP32", "FP32"), torch.float16: ("TYPE_FP16", "FP16"),
                torch.bfloat16: ("TYPE_BF16", "BF16"), torch.int64: ("TYPE_INT64", "INT64")}


@dataclass(frozen=True)
class WireTensor:
    """One Triton input: its name, wire dtype and dims after Triton's batch dim (-1: any)."""

    name: str
    dtype: torch.dtype
    dims: tuple[int, ...]


def fixed_suffix(spec: TensorSpec) -> tuple[int, ...]:
    """The schema's trailing fixed dims after the first (dim 0 and any symbolic dim become rows)."""
    suffix: list[int] = []
    for dim in reversed(spec.dims[1:]):
        if not isinstance(dim, int):
            break
        suffix.insert(0, dim)
    return tuple(suffix)


def wire_dtype(spec: TensorSpec) -> torch.dtype:
    return torch.float32 if spec.kind == FLOAT else torch.int64


def input_tensors(schema: ItemSchema) -> list[WireTensor]:
    """The Triton inputs of one modality's model, in schema order."""
    out: list[WireTensor] = []
    for spec in schema.tensors:
        out.append(WireTensor(spec.name, wire_dtype(spec), (-1, *fixed_suffix(spec))))
        out.append(WireTensor(spec.name + SHAPE_SUFFIX, torch.int64, (-1, len(spec.dims))))
    return out


def pack_items(schema: ItemSchema, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A unit's items as Triton inputs (CPU, contiguous, with the batch dim of 1)."""
    out: dict[str, torch.Tensor] = {}
    for spec in schema.tensors:
        suffix = fixed_suffix(spec)
        parts = [item[spec.name].detach().to("cpu", wire_dtype(spec)).reshape(-1, *suffix) for item in items]
        out[spec.name] = torch.cat(parts).unsqueeze(0).contiguous()
        out[spec.name + SHAPE_SUFFIX] = torch.tensor([list(item[spec.name].shape) for item in items],
                                                     dtype=torch.int64).unsqueeze(0)
    return out


def unpack_items(schema: ItemSchema, inputs: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The items of one request, each tensor in its own shape (the inverse of pack_items, dtypes widened)."""
    items: list[dict[str, torch.Tensor]] | None = None
    for spec in schema.tensors:
        flat, shapes = inputs[spec.name][0], inputs[spec.name + SHAPE_SUFFIX][0].tolist()
        suffix = fixed_suffix(spec)
        rows = [math.prod(shape[: len(shape) - len(suffix)]) for shape in shapes]
        if sum(rows) != flat.shape[0] or any(tuple(shape[len(shape) - len(suffix):]) != suffix for shape in shapes):
            raise ValueError(f"{spec.name}: {flat.shape[0]} rows of {list(suffix)} do not hold items of shapes {shapes}")
        pieces = [piece.reshape(shape) for piece, shape in zip(flat.split(rows), shapes)]
        if items is None:
            items = [{} for _ in pieces]
        if len(pieces) != len(items):
            raise ValueError(f"{spec.name}__shape holds {len(pieces)} items, another input {len(items)}")
        for item, piece in zip(items, pieces):
            item[spec.name] = piece
    return items or []


def pack_embeddings(results: list[ItemEmbeddings]) -> dict[str, torch.Tensor]:
    """A unit's embeddings as Triton outputs (with the batch dim of 1)."""
    out = {EMBEDDINGS: torch.cat([r.embeddings for r in results]).unsqueeze(0).contiguous(),
           EMBEDDING_ROWS: torch.tensor([[r.embeddings.shape[0] for r in results]], dtype=torch.int64)}
    layers = len(results[0].deepstack) if results else 0
    if layers:
        out[DEEPSTACK] = torch.stack([torch.cat([r.deepstack[k] for r in results])
                                      for k in range(layers)]).unsqueeze(0).contiguous()
    return out


def unpack_embeddings(outputs: dict[str, torch.Tensor]) -> list[ItemEmbeddings]:
    """One ItemEmbeddings per item of the unit, from the Triton outputs."""
    rows = outputs[EMBEDDING_ROWS][0].tolist()
    embeddings = outputs[EMBEDDINGS][0].split(rows)
    if DEEPSTACK not in outputs:
        return [ItemEmbeddings(embeddings=e) for e in embeddings]
    per_layer = [layer.split(rows) for layer in outputs[DEEPSTACK][0]]
    return [ItemEmbeddings(embeddings=e, deepstack=tuple(layer[i] for layer in per_layer))
            for i, e in enumerate(embeddings)]
