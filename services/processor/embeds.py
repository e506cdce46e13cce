"""Precomputed embeddings: a client sends an image's embeddings (MediaEmbeddings) instead of its bytes.

The processor still expands the image's placeholders, and for that it needs the HF processor's
view of the image. It runs the HF processor on a stand-in: a blank image of the original size.
For every family Triptych serves the placeholder count and the position inputs (Qwen's
image_grid_thw) depend on the image's size only -- resizing, tiling and cropping are chosen from
width and height, never from pixel values (tests/processor/test_embeds.py checks every family).
The stand-in's pixel tensors are dropped: no encoder is called for the item, and the caller's
tensors go to the LLM as they came.

Checked here, before the HF processor: the size, the width (hidden size), the dtype, the number
of deepstack tensors and their shapes, the byte length, finiteness. The row count needs the HF
processor's placeholder count: `check_rows` runs after it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.errors import InvalidArgument
from services.common.tensors import DataType, from_proto, wire_dtype
from services.models.base import ProcessedItem


@dataclass(frozen=True)
class EmbeddingSpec:
    """What the model takes: each row `hidden_size` wide in `dtype`, `num_deepstack_layers` extra tensors."""

    family_name: str
    hidden_size: int
    dtype: torch.dtype
    num_deepstack_layers: int
    fingerprint: str
    max_image_pixels: int


@dataclass(frozen=True)
class Precomputed:
    """A Media's embeddings, checked against the model but for their row count (see check_rows)."""

    where: str  # e.g. "messages[0].content[1].image.embeddings"
    width_px: int
    height_px: int
    item: encoder_pb2.ItemEmbeddings  # as an encoder would answer for the item, mm_hash set

    @property
    def num_rows(self) -> int:
        return self.item.embeddings.shape[0]


def read_embeddings(media: processor_pb2.Media, spec: EmbeddingSpec, where: str) -> tuple[Image.Image, Precomputed]:
    """The stand-in image the HF processor sees for the item, and the item's checked embeddings."""
    source = media.embeddings
    where = f"{where}.embeddings"
    width, height = source.width_px, source.height_px
    if width < 1 or height < 1:
        raise InvalidArgument(f"{where}: width_px x height_px is {width}x{height}; send the size of the image the "
                              "embeddings were computed from (each at least 1)", reason="EMBEDDINGS_IMAGE_SIZE_MISSING")
    if width * height > spec.max_image_pixels:
        raise InvalidArgument(f"{where}: image is {width}x{height} = {width * height} pixels; the limit is "
                              f"{spec.max_image_pixels}", reason="IMAGE_TOO_LARGE",
                              metadata={"maxImagePixels": str(spec.max_image_pixels)})
    embeddings = source.embeddings
    _check_tensor(f"{where}.embeddings", embeddings, spec)
    if len(source.deepstack_embeddings) != spec.num_deepstack_layers:
        raise InvalidArgument(
            f"{where}: {len(source.deepstack_embeddings)} deepstack_embeddings; the {spec.family_name} model takes "
            f"{spec.num_deepstack_layers} (one per deepstack layer, as the encoder returns them)",
            reason="DEEPSTACK_COUNT_MISMATCH", metadata={"deepstackLayers": str(spec.num_deepstack_layers)})
    for index, layer in enumerate(source.deepstack_embeddings):
        name = f"{where}.deepstack_embeddings[{index}]"
        _check_tensor(name, layer, spec)
        if list(layer.shape) != list(embeddings.shape):
            raise InvalidArgument(f"{name} has shape {list(layer.shape)}, the embeddings {list(embeddings.shape)}; "
                                  "each deepstack tensor has one row per embedding row",
                                  reason="EMBEDDING_SHAPE_MISMATCH", metadata={"hiddenSize": str(spec.hidden_size)})
    item = encoder_pb2.ItemEmbeddings(mm_hash=media.uuid or _content_hash(source, spec.fingerprint),
                                      embeddings=embeddings, deepstack_embeddings=source.deepstack_embeddings)
    # Mode "RGB": what every family's processor converts an image to; the pixel values are never used.
    return Image.new("RGB", (width, height)), Precomputed(where, width, height, item)


def check_rows(precomputed: Precomputed, item: ProcessedItem, hidden_size: int) -> None:
    """The embeddings have one row per placeholder token the HF processor made for an image of that size."""
    if precomputed.num_rows != item.length:
        raise InvalidArgument(
            f"{precomputed.where}.embeddings has {precomputed.num_rows} rows; an image of "
            f"{precomputed.width_px}x{precomputed.height_px} takes {item.length} placeholder tokens in this model "
            "(send the embeddings of the image at its original size)", reason="EMBEDDING_SHAPE_MISMATCH",
            metadata={"placeholderTokens": str(item.length), "hiddenSize": str(hidden_size)})


def _check_tensor(name: str, proto: tensor_pb2.Tensor, spec: EmbeddingSpec) -> None:
    """[rows >= 1, hidden_size] in the model's dtype (no cast), the bytes the shape needs, all finite."""
    shape = list(proto.shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] != spec.hidden_size:
        shown = "unset" if not proto.ListFields() else f"of shape {shape}"
        raise InvalidArgument(f"{name} is {shown}; expected [num_tokens, {spec.hidden_size}] (one row per placeholder "
                              "token, the model's hidden size)", reason="EMBEDDING_SHAPE_MISMATCH",
                              metadata={"hiddenSize": str(spec.hidden_size)})
    expected = wire_dtype(spec.dtype)
    if proto.dtype != expected:
        got = DataType.Name(proto.dtype) if proto.dtype in DataType.values() else str(proto.dtype)
        raise InvalidArgument(f"{name} are {got}, the model runs in {DataType.Name(expected)}; send them in "
                              "the model's dtype (ModelInfo.embedding_dtype)", reason="EMBEDDING_DTYPE_MISMATCH")
    tensor = from_proto(proto, name)  # the byte length against the shape
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        row, column = (~finite).nonzero()[0].tolist()
        raise InvalidArgument(f"{name} holds NaN or Inf (first at row {row}, column {column}); embeddings must be "
                              "finite", reason="EMBEDDING_NOT_FINITE", metadata={"input": name})


def _content_hash(source: processor_pb2.MediaEmbeddings, fingerprint: str) -> str:
    """The item's identity without a caller uuid: its tensors' bytes, the image size and the model."""
    digest = hashlib.sha256(f"{fingerprint}\0image-embeddings\0{source.width_px}x{source.height_px}\0".encode())
    for tensor in (source.embeddings, *source.deepstack_embeddings):
        digest.update(f"{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.data)
    return digest.hexdigest()
