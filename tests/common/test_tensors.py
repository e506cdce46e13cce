from __future__ import annotations

import pytest
import torch

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.errors import InvalidArgument
from services.common.tensors import from_named, from_proto, to_named, to_proto


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                   torch.uint8, torch.bool])
def test_round_trip_is_exact(dtype):
    source = (torch.randn(3, 5, 7) * 100).to(dtype)
    back = from_proto(to_proto(source))
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back, source)


def test_two_byte_dtypes_travel_as_two_bytes():
    t = torch.ones(10, 64, dtype=torch.bfloat16)
    assert len(to_proto(t).data) == 10 * 64 * 2
    assert len(to_proto(t.float()).data) == 10 * 64 * 4


def test_bytes_are_little_endian_row_major():
    proto = to_proto(torch.tensor([[1, 2], [3, 4]], dtype=torch.int32))
    assert proto.data == b"".join(i.to_bytes(4, "little") for i in (1, 2, 3, 4))


def test_non_contiguous_tensor():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).T
    assert torch.equal(from_proto(to_proto(t)), t)


def test_wrong_byte_count_is_invalid_argument():
    proto = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(InvalidArgument, match="needs 24 bytes"):
        from_proto(proto)


def test_unknown_dtype_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        from_proto(tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_UNSPECIFIED, shape=[1], data=b"\0"))


def test_named_round_trip_and_duplicates():
    named = to_named({"a": torch.zeros(2), "b": torch.ones(1, dtype=torch.int64)})
    assert list(from_named(named)) == ["a", "b"]
    with pytest.raises(InvalidArgument, match="given twice"):
        from_named([*named, named[0]])


def test_slice_rows_matches_torch_slicing():
    from services.common.tensors import slice_rows

    t = torch.randn(7, 5).to(torch.bfloat16)
    proto = to_proto(t)
    assert torch.equal(from_proto(slice_rows(proto, slice(2, 6))), t[2:6])
    assert slice_rows(proto, slice(0, 7)) is proto
