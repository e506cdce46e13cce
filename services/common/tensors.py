"""Tensor proto <-> torch, the only place where tensors cross the wire format.

Bytes are row-major little-endian (DESIGN §3); bf16 travels as 2-byte words.
Parsing validates dtype and byte length and raises InvalidArgument, so a
malformed tensor never reaches torch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping

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


def from_proto(proto: tensor_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Parses a wire tensor into a CPU torch tensor; a wrong byte length is INVALID_ARGUMENT."""
    dtype = torch_dtype(proto.dtype)
    np_dtype = _WIRE[dtype][1]
    shape = tuple(proto.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{name}: negative dimension in shape {list(shape)}", reason="TENSOR_SHAPE_INVALID")
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if len(proto.data) != expected:
        raise InvalidArgument(
            f"{name}: shape {list(shape)} needs {expected} bytes of {DataType.Name(proto.dtype)}, got {len(proto.data)}",
            reason="TENSOR_SIZE_MISMATCH",
        )
    array = np.frombuffer(proto.data, dtype=np_dtype).reshape(shape)
    tensor = torch.from_numpy(array.copy())  # copy: protobuf bytes are read-only
    if dtype == torch.bfloat16:
        return tensor.view(torch.bfloat16)
    if dtype == torch.bool:
        return tensor.to(torch.bool)
    return tensor


def slice_rows(proto: tensor_pb2.Tensor, rows: slice) -> tensor_pb2.Tensor:
    """Rows [start, stop) of a wire tensor along its first axis, without decoding it."""
    if rows.start == 0 and rows.stop == (proto.shape[0] if proto.shape else 0):
        return proto
    row_bytes = len(proto.data) // proto.shape[0]
    return tensor_pb2.Tensor(dtype=proto.dtype, shape=[rows.stop - rows.start, *proto.shape[1:]],
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
