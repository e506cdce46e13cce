"""Chunked tensors: split and put back together exactly; every way a stream can be wrong is refused."""

from __future__ import annotations

import asyncio

import pytest
import torch

from services.common import chunks
from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.api.triptych.llm.v1 import llm_pb2
from services.common.errors import Internal, InvalidArgument
from services.common.tensors import from_proto, to_proto

BUDGET = 64 << 10


def _embeddings(rows: int, seed: int, hidden: int = 64) -> torch.Tensor:
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed))


def _reply(*row_counts: int, deepstack: int = 0) -> encoder_pb2.EncodeResponse:
    return encoder_pb2.EncodeResponse(items=[
        encoder_pb2.ItemEmbeddings(mm_hash=f"h{i}", embeddings=to_proto(_embeddings(rows, i)),
                                   deepstack_embeddings=[to_proto(_embeddings(rows, 100 + i * 10 + k))
                                                         for k in range(deepstack)])
        for i, rows in enumerate(row_counts)
    ])


def _request(*row_counts: int) -> llm_pb2.StreamGenerateRequest:
    offsets = [sum(row_counts[:i]) + i for i in range(len(row_counts))]
    return llm_pb2.StreamGenerateRequest(model_fingerprint="fp", prompt=llm_pb2.Prompt(
        token_ids=list(range(sum(row_counts) + len(row_counts))),
        multimodal_inputs=[llm_pb2.MultimodalInput(
            placeholder=tensor_pb2.PlaceholderRange(offset=offset, length=rows),
            embeddings=to_proto(_embeddings(rows, i)),
            position_inputs=[tensor_pb2.NamedTensor(name="image_grid_thw", tensor=to_proto(torch.tensor([[1, 2, 2]])))],
        ) for i, (offset, rows) in enumerate(zip(offsets, row_counts))]))


async def _replay(messages):
    for message in messages:
        yield message


def _receive(messages) -> tuple[llm_pb2.StreamGenerateRequest, chunks.Assembler]:
    return asyncio.run(chunks.receive_generate_request(_replay(messages)))


def _copy(message):
    out = type(message)()
    out.CopyFrom(message)
    return out


def test_a_small_reply_is_one_message_unchanged():
    reply = _reply(4, 6)
    messages = chunks.split_encode_response(_copy(reply), BUDGET)
    assert len(messages) == 1 and not messages[0].chunks
    assert list(messages[0].items) == list(reply.items)


def test_a_reply_larger_than_the_budget_comes_back_bit_for_bit():
    reply = _reply(300, 1000, 7, deepstack=2)  # 1000 rows x 64 x 4 B = 256 KiB: one tensor spans messages
    messages = chunks.split_encode_response(_copy(reply), BUDGET)
    assert len(messages) > 12
    assert all(m.ByteSize() <= BUDGET + chunks.MESSAGE_ROOM_BYTES for m in messages)
    assert all(not m.items for m in messages[1:])
    assert all(t.WhichOneof("external_data") == "chunked_id" for _, t in chunks.item_tensors(messages[0].items))

    got = encoder_pb2.EncodeResponse(items=messages[0].items)
    assembler = chunks.Assembler()
    assembler.declare(chunks.item_tensors(got.items))
    for message in messages:
        assembler.add(message.chunks)
    assembler.finish().inline()
    assert got == reply


def test_a_large_request_crosses_in_chunks_and_parses_to_the_same_tensors():
    request = _request(700, 3, 900)
    expected = [from_proto(mm.embeddings) for mm in request.prompt.multimodal_inputs]
    messages = chunks.split_generate_request(_copy(request), BUDGET)
    assert messages[0].HasField("request") and not any(m.HasField("request") for m in messages[1:])
    assert all(m.ByteSize() <= BUDGET + chunks.MESSAGE_ROOM_BYTES for m in messages)

    got, assembler = _receive(messages)
    assembled = assembler.finish()
    for mm, want in zip(got.prompt.multimodal_inputs, expected):
        assert mm.embeddings.WhichOneof("external_data") == "chunked_id"
        assert torch.equal(from_proto(mm.embeddings, external={"chunked_id": assembled}), want)
    assert got.prompt.multimodal_inputs[0].position_inputs == request.prompt.multimodal_inputs[0].position_inputs


def _chunked(request=None) -> list[llm_pb2.ChunkedStreamGenerateRequest]:
    return chunks.split_generate_request(request or _request(600), 32 << 10)


def _error(messages, *, finish: bool = True) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        _, assembler = _receive(messages)
        if finish:
            assembler.finish()
    return caught.value


def test_chunks_out_of_order_are_refused():
    messages = _chunked()
    messages[1], messages[2] = messages[2], messages[1]
    err = _error(messages)
    assert err.reason == "TENSOR_CHUNK_INVALID" and "in order" in err.message


def test_a_missing_chunk_is_refused_with_the_byte_counts():
    messages = _chunked()
    err = _error(messages[:-1])
    assert err.reason == "TENSOR_CHUNKS_INCOMPLETE"
    assert err.metadata["expectedBytes"] == str(600 * 64 * 4)
    assert int(err.metadata["receivedBytes"]) < 600 * 64 * 4


def test_chunks_past_the_declared_shape_are_refused():
    messages = _chunked()
    messages[0].request.prompt.multimodal_inputs[0].embeddings.shape[:] = [500, 64]  # fewer bytes than sent
    err = _error(messages)
    assert err.reason == "TENSOR_CHUNK_INVALID" and "run past" in err.message


def test_a_chunk_for_an_undeclared_tensor_is_refused():
    messages = _chunked()
    messages[-1].chunks[0].chunked_id = 7
    err = _error(messages)
    assert err.reason == "TENSOR_CHUNK_INVALID" and err.metadata["chunkedId"] == "7"


def test_a_stream_must_start_with_its_request_and_set_it_once():
    messages = _chunked()
    assert _error(messages[1:]).reason == "TENSOR_CHUNK_INVALID"
    assert _error([messages[0], messages[0]]).reason == "TENSOR_CHUNK_INVALID"
    assert _error([]).reason == "TENSOR_CHUNKS_INCOMPLETE"


def test_two_tensors_with_one_chunked_id_are_refused():
    request = _request(600, 600)
    messages = chunks.split_generate_request(request, 32 << 10)
    messages[0].request.prompt.multimodal_inputs[1].embeddings.chunked_id = 1
    assert _error(messages).reason == "TENSOR_CHUNK_INVALID"


def test_the_receiver_check_runs_before_any_chunk_is_kept():
    seen = []

    def check(request):
        seen.append(len(request.prompt.multimodal_inputs))
        raise InvalidArgument("too big", reason="EMBEDDING_SHAPE_MISMATCH")

    async def messages():
        yield _chunked()[0]
        raise AssertionError("the receiver read past the first message")

    with pytest.raises(InvalidArgument):
        asyncio.run(chunks.receive_generate_request(messages(), check=check))
    assert seen == [1]


def test_chunked_bytes_where_only_inline_ones_are_taken_are_refused():
    proto = chunks.split_generate_request(_request(600), 32 << 10)[0].request.prompt.multimodal_inputs[0].embeddings
    with pytest.raises(InvalidArgument) as caught:
        from_proto(proto, "x")
    assert caught.value.reason == "TENSOR_LOCATION_UNSUPPORTED"


def test_the_processor_side_raises_internal_for_a_bad_reply():
    assembler = chunks.Assembler(error=Internal)
    reply = _reply(600)
    messages = chunks.split_encode_response(reply, 32 << 10)
    assembler.declare(chunks.item_tensors(messages[0].items))
    assembler.add(messages[0].chunks)
    with pytest.raises(Internal) as caught:
        assembler.finish()
    assert caught.value.reason == "TENSOR_CHUNKS_INCOMPLETE"
