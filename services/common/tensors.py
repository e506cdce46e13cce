"""Tensor proto <-> torch, the only place where tensors cross the wire format.

Bytes are row-major little-endian (DESIGN §3); bf16 travels as 2-byte words.
Parsing validates dtype and byte length and raises InvalidArgument, so a
malformed tensor never reaches torch. A tensor whose bytes are not inline
(Tensor.external_data: chunks of a stream, a shared-memory region) is read
through the `ExternalBytes` source the caller passes for that location
(services/common/chunks.py, services/common/shm.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np
import torch

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.errors import InvalidArgument

DataType = tensor_pb2.DataType

# torch dtype -> (wire dtype, numpy dtype of the bytes on the wire)
_WIRE: dict[torch.dtype, tuple[int, np.dtype]] = {
    torch.float32: (DataType.DATA_TYPE_FLOAT32, np.dtype("<f4")),
    torch.float16: (DataType.DATA_TYPE_FLOAT16, np.dtype("<f2")),
    torch.bfloat16: (DataType.DATA_TYPE_BFLOAT16, np.dtype("<i2")),  # raw 2-byte words
    torch.int64: (DataType.DATA_TYPE_INT64, np.dtype("<i8")),
    torch.int32: (DataType.DATA_TYPE_INT32, np.dtype("<i4")),
    torch.uint8: (DataType.DATA_TYPE_UINT8, np.dtype("u1")),
    torch.bool: (DataType.DATA_TYPE_BOOL, np.dtype("u1")),
}
_TORCH_BY_WIRE = {wire: torch_dtype for torch_dtype, (wire, _) in _WIRE.items()}


def wire_dtype(dtype: torch.dtype) -> int:
    """The proto DataType of a torch dtype."""
    try:
        return _WIRE[dtype][0]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no wire type") from None


def torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype of a proto DataType; unknown values are INVALID_ARGUMENT."""
    try:
        return _TORCH_BY_WIRE[wire]
    except KeyError:
        raise InvalidArgument(f"unsupported tensor dtype {wire}", reason="TENSOR_DTYPE_UNSUPPORTED") from None


def to_proto(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Serialises a tensor (any device, any layout) to its wire form."""
    wire, np_dtype = _WIRE[tensor.dtype]
    flat = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    elif tensor.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    array = flat.numpy()
    if sys.byteorder != "little":
        array = array.astype(np_dtype)
    return tensor_pb2.Tensor(dtype=wire, shape=list(tensor.shape), data=array.tobytes())


class ExternalBytes(Protocol):
    """Where the bytes of tensors with one kind of external_data come from (chunks, shared memory)."""

    def payload(self, proto: tensor_pb2.Tensor, nbytes: int, name: str) -> bytearray:
        """The tensor's `nbytes` bytes, in a buffer the caller may keep (a torch tensor views it)."""
        ...


def num_bytes(proto: tensor_pb2.Tensor, name: str = "tensor") -> int:
    """prod(shape) * sizeof(dtype): what the tensor's bytes must number; a bad dtype or shape is INVALID_ARGUMENT."""
    itemsize = _WIRE[torch_dtype(proto.dtype)][1].itemsize
    if any(d < 0 for d in proto.shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {list(proto.shape)}", reason="TENSOR_SHAPE_INVALID")
    # Python ints, not np.prod: int64 wraps (shape [2**32, 2**32] would need 0 bytes and pass as empty).
    return math.prod(proto.shape) * itemsize


def from_proto(proto: tensor_pb2.Tensor, name: str = "tensor",
               external: Mapping[str, ExternalBytes] | None = None) -> torch.Tensor:
    """Parses a wire tensor into a CPU torch tensor; a wrong byte length is INVALID_ARGUMENT.

    `external` maps an external_data kind ("chunked_id", "shm") to the source of such bytes; a
    tensor whose bytes lie elsewhere than the caller accepts is INVALID_ARGUMENT.
    """
    dtype = torch_dtype(proto.dtype)
    np_dtype = _WIRE[dtype][1]
    shape = tuple(proto.shape)
    expected = num_bytes(proto, name)
    location = proto.WhichOneof("external_data")
    if location is not None:
        source = (external or {}).get(location)
        if source is None:
            raise InvalidArgument(f"{name}: its bytes must be inline here (Tensor.data), not in {location}",
                                  reason="TENSOR_LOCATION_UNSUPPORTED", metadata={"input": name})
        if proto.data:
            raise InvalidArgument(f"{name}: sets both data and {location}; send the bytes one way",
                                  reason="TENSOR_SIZE_MISMATCH")
        buffer = source.payload(proto, expected, name)
        array = np.frombuffer(buffer, dtype=np_dtype, count=expected // np_dtype.itemsize).reshape(shape)
    else:
        if len(proto.data) != expected:
            raise InvalidArgument(
                f"{name}: shape {list(shape)} needs {expected} bytes of {DataType.Name(proto.dtype)}, "
                f"got {len(proto.data)}", reason="TENSOR_SIZE_MISMATCH")
        array = np.frombuffer(proto.data, dtype=np_dtype).reshape(shape).copy()  # copy: protobuf bytes are read-only
    tensor = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        return tensor.view(torch.bfloat16)
    if dtype == torch.bool:
        return tensor.to(torch.bool)
    return tensor


def slice_rows(proto: tensor_pb2.Tensor, rows: slice) -> tensor_pb2.Tensor:
    """Rows [start, stop) of a wire tensor along its first axis, without decoding it.

    Inline bytes are cut; a shared-memory tensor keeps its region, its offset moved to the first row.
    """
    if rows.start == 0 and rows.stop == (proto.shape[0] if proto.shape else 0):
        return proto
    row_bytes = num_bytes(proto) // proto.shape[0]
    shape = [rows.stop - rows.start, *proto.shape[1:]]
    if proto.HasField("shm"):
        shm = tensor_pb2.SharedMemoryHandle()
        shm.CopyFrom(proto.shm)
        shm.offset_bytes += rows.start * row_bytes
        return tensor_pb2.Tensor(dtype=proto.dtype, shape=shape, shm=shm)
    return tensor_pb2.Tensor(dtype=proto.dtype, shape=shape,
                             data=proto.data[rows.start * row_bytes : rows.stop * row_bytes])


def to_named(tensors: Mapping[str, torch.Tensor]) -> list[tensor_pb2.NamedTensor]:
    """Serialises a name -> tensor mapping, in the mapping's order."""
    return [tensor_pb2.NamedTensor(name=k, tensor=to_proto(v)) for k, v in tensors.items()]


def from_named(named: Iterable[tensor_pb2.NamedTensor]) -> dict[str, torch.Tensor]:
    """Parses named tensors; a repeated name is INVALID_ARGUMENT."""
    out: dict[str, torch.Tensor] = {}
    for item in named:
        if item.name in out:
            raise InvalidArgument(f"tensor {item.name!r} given twice", reason="TENSOR_NAME_DUPLICATE")
        out[item.name] = from_proto(item.tensor, item.name)
    return out
