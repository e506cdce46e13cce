"""Embeddings larger than one gRPC message: cut into TensorChunk messages and put back together.

DESIGN §3: a tensor larger than one message should carry travels in chunks. The sender moves the
bytes of every embedding tensor out of the message (`Tensor.chunked_id` set, `data` empty) and sends
them as TensorChunks, at most `budget` bytes per message; the receiver declares the chunked tensors
it read and takes their chunks in order, and refuses anything else: a chunk for no declared tensor,
out of order or past the tensor's end (TENSOR_CHUNK_INVALID), a stream that ends with bytes missing
(TENSOR_CHUNKS_INCOMPLETE).

Two streams use it: EncoderService.StreamEncode (encoder -> processor, `split_encode_response`,
`call_encode`) and LlmService.ChunkedStreamGenerate (processor -> LLM, `split_generate_request`,
`receive_generate_request`). A reply or request that fits one message is sent whole, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2
from services.common.config import ServerConfig
from services.common.errors import Internal, InvalidArgument, TriptychError
from services.common.tensors import num_bytes

# Room a message keeps for everything but tensor bytes: ids, shapes, mm hashes, a prompt's token ids.
MESSAGE_ROOM_BYTES = 64 << 10
# A TensorChunk's fields other than its bytes take at most this many bytes on the wire.
CHUNK_OVERHEAD_BYTES = 32


# The smallest budget a sender uses, whatever a caller asks for: a chunk is worth its message.
MIN_CHUNK_BYTES = 4096


def chunk_budget(max_message_bytes: int) -> int:
    """Tensor bytes one message may carry under a message size limit of `max_message_bytes`."""
    return max(max_message_bytes - MESSAGE_ROOM_BYTES, MIN_CHUNK_BYTES)


# What a processor's channel takes (services/common/server.py channel_options): its StreamEncode replies' limit.
DEFAULT_CHUNK_BYTES = chunk_budget(ServerConfig.max_message_mib << 20)


# ---- which tensors are embeddings -----------------------------------------------------------------
def item_tensors(items: Iterable[encoder_pb2.ItemEmbeddings]) -> Iterator[tuple[str, tensor_pb2.Tensor]]:
    """(name, tensor) of every embedding tensor of an Encode reply's items, in order."""
    for i, item in enumerate(items):
        if item.HasField("embeddings"):
            yield f"items[{i}].embeddings", item.embeddings
        for k, deep in enumerate(item.deepstack_embeddings):
            yield f"items[{i}].deepstack_embeddings[{k}]", deep
        if item.HasField("cross_attention_states"):
            yield f"items[{i}].cross_attention_states", item.cross_attention_states


def prompt_tensors(prompt: llm_pb2.Prompt) -> Iterator[tuple[str, tensor_pb2.Tensor]]:
    """(name, tensor) of every embedding tensor of an LLM prompt, in order (position inputs stay inline)."""
    for i, mm in enumerate(prompt.multimodal_inputs):
        if mm.HasField("embeddings"):
            yield f"prompt.multimodal_inputs[{i}].embeddings", mm.embeddings
        for k, deep in enumerate(mm.deepstack_embeddings):
            yield f"prompt.multimodal_inputs[{i}].deepstack_embeddings[{k}]", deep
        if mm.HasField("cross_attention_states"):
            yield f"prompt.multimodal_inputs[{i}].cross_attention_states", mm.cross_attention_states


# ---- sending ----------------------------------------------------------------------------------------
def inline_bytes(tensors: Iterable[tensor_pb2.Tensor]) -> int:
    """Bytes the inline tensors carry, from their shapes: reading `data` (or ByteSize) would copy them."""
    return sum(num_bytes(t) for t in tensors if t.WhichOneof("external_data") is None)


def fits_one_message(tensors: Iterable[tensor_pb2.Tensor], budget: int) -> bool:
    """Whether a message whose tensors are these fits a message of `budget` tensor bytes."""
    return inline_bytes(tensors) <= budget


def detach(tensors: Iterable[tensor_pb2.Tensor]) -> list[tuple[int, bytes]]:
    """Moves the bytes of every inline, non-empty tensor out of its message: chunked_id 1, 2, ... set,
    data cleared. Returns (chunked_id, bytes) in order."""
    payloads = []
    for tensor in tensors:
        if tensor.WhichOneof("external_data") is not None or not tensor.data:
            continue
        chunked_id = len(payloads) + 1
        payloads.append((chunked_id, tensor.data))
        tensor.ClearField("data")
        tensor.chunked_id = chunked_id
    return payloads


def pack(payloads: Sequence[tuple[int, bytes]], budget: int, first_room: int) -> list[list[tensor_pb2.TensorChunk]]:
    """The chunks of each message, in order: at most `first_room` bytes in the first, `budget` in the others."""
    if budget <= CHUNK_OVERHEAD_BYTES:
        raise ValueError(f"a chunk budget of {budget} bytes leaves no room for bytes")
    messages: list[list[tensor_pb2.TensorChunk]] = [[]]
    room = first_room
    for chunked_id, data in payloads:
        view, offset = memoryview(data), 0
        while offset < len(data):
            take = min(room - CHUNK_OVERHEAD_BYTES, len(data) - offset)
            if take <= 0:  # this message is full
                messages.append([])
                room = budget
                continue
            part = data if take == len(data) else bytes(view[offset:offset + take])  # protobuf takes bytes only
            messages[-1].append(tensor_pb2.TensorChunk(chunked_id=chunked_id, offset_bytes=offset, data=part))
            offset += take
            room -= take + CHUNK_OVERHEAD_BYTES
    return messages


def split_encode_response(response: encoder_pb2.EncodeResponse, budget: int) -> list[encoder_pb2.StreamEncodeResponse]:
    """StreamEncode's messages for a reply: the reply whole when it fits one message, else its items with
    the embedding bytes detached, then the chunks. Consumes `response` when it chunks."""
    if fits_one_message((t for _, t in item_tensors(response.items)), budget):
        return [encoder_pb2.StreamEncodeResponse(items=response.items)]
    payloads = detach(tensor for _, tensor in item_tensors(response.items))
    first = encoder_pb2.StreamEncodeResponse(items=response.items)
    parts = pack(payloads, budget, budget - first.ByteSize())
    first.chunks.extend(parts[0])
    return [first, *(encoder_pb2.StreamEncodeResponse(chunks=chunks) for chunks in parts[1:])]


def split_generate_request(request: llm_pb2.StreamGenerateRequest,
                           budget: int) -> list[llm_pb2.ChunkedStreamGenerateRequest]:
    """ChunkedStreamGenerate's messages for a request: the request with its embedding bytes detached, then
    the chunks. Consumes `request`."""
    payloads = detach(tensor for _, tensor in prompt_tensors(request.prompt))
    first = llm_pb2.ChunkedStreamGenerateRequest(request=request)
    parts = pack(payloads, budget, budget - first.ByteSize())
    first.chunks.extend(parts[0])
    return [first, *(llm_pb2.ChunkedStreamGenerateRequest(chunks=chunks) for chunks in parts[1:])]


# ---- receiving --------------------------------------------------------------------------------------
@dataclass
class _Incoming:
    name: str
    tensor: tensor_pb2.Tensor
    expected: int
    parts: list[bytes] = field(default_factory=list)
    received: int = 0


class Assembler:
    """Declared chunked tensors and their chunks as they arrive; `finish` checks that all came whole.

    `error` is the class of the errors it raises: InvalidArgument where a caller sent the stream (the
    LLM), Internal where a service we called did (the processor reading an encoder's reply).
    """

    def __init__(self, error: type[TriptychError] = InvalidArgument):
        self.error = error
        self.tensors: dict[int, _Incoming] = {}

    def declare(self, tensors: Iterable[tuple[str, tensor_pb2.Tensor]]) -> None:
        for name, tensor in tensors:
            if tensor.WhichOneof("external_data") != "chunked_id":
                continue
            chunked_id = tensor.chunked_id
            if chunked_id in self.tensors:
                raise self._invalid(f"{name} and {self.tensors[chunked_id].name} share chunked_id {chunked_id}",
                                    chunked_id)
            self.tensors[chunked_id] = _Incoming(name, tensor, num_bytes(tensor, name))

    def add(self, chunks: Iterable[tensor_pb2.TensorChunk]) -> None:
        """Takes a message's chunks (cheap: checks and keeps references; `finish` copies)."""
        for chunk in chunks:
            incoming = self.tensors.get(chunk.chunked_id)
            if incoming is None:
                raise self._invalid(f"a chunk names chunked_id {chunk.chunked_id}, which no tensor declared "
                                    "before it", chunk.chunked_id)
            data = chunk.data
            if chunk.offset_bytes != incoming.received:
                raise self._invalid(f"{incoming.name}: a chunk starts at byte {chunk.offset_bytes}, the previous "
                                    f"one ended at {incoming.received}; send each tensor's chunks in order",
                                    chunk.chunked_id)
            if incoming.received + len(data) > incoming.expected:
                raise self._invalid(f"{incoming.name}: chunks run past its {incoming.expected} bytes "
                                    f"(shape {list(incoming.tensor.shape)})", chunk.chunked_id)
            incoming.parts.append(data)
            incoming.received += len(data)

    def finish(self) -> Assembled:
        """Every declared tensor whole, its bytes in one buffer; else TENSOR_CHUNKS_INCOMPLETE."""
        for chunked_id, incoming in self.tensors.items():
            if incoming.received != incoming.expected:
                raise self.error(
                    f"{incoming.name}: the stream ended after {incoming.received} of its {incoming.expected} bytes",
                    reason="TENSOR_CHUNKS_INCOMPLETE",
                    metadata={"chunkedId": str(chunked_id), "expectedBytes": str(incoming.expected),
                              "receivedBytes": str(incoming.received)})
        buffers = {}
        for chunked_id, incoming in self.tensors.items():
            buffer, offset = bytearray(incoming.expected), 0
            for part in incoming.parts:
                buffer[offset:offset + len(part)] = part
                offset += len(part)
            incoming.parts.clear()
            buffers[chunked_id] = buffer
        return Assembled(buffers, [(incoming.tensor, chunked_id) for chunked_id, incoming in self.tensors.items()])

    def _invalid(self, message: str, chunked_id: int) -> TriptychError:
        return self.error(message, reason="TENSOR_CHUNK_INVALID", metadata={"chunkedId": str(chunked_id)})


@dataclass
class Assembled:
    """The bytes of a stream's chunked tensors: read by `tensors.from_proto` (ExternalBytes for
    "chunked_id"), or put back inline with `inline()`."""

    buffers: dict[int, bytearray]
    declared: list[tuple[tensor_pb2.Tensor, int]]

    def payload(self, proto: tensor_pb2.Tensor, nbytes: int, name: str) -> bytearray:
        buffer = self.buffers.get(proto.chunked_id)
        if buffer is None or len(buffer) != nbytes:  # a tensor the stream did not declare
            raise InvalidArgument(f"{name}: no chunks of {nbytes} bytes for chunked_id {proto.chunked_id}",
                                  reason="TENSOR_CHUNK_INVALID", metadata={"chunkedId": str(proto.chunked_id)})
        return buffer

    def inline(self) -> None:
        """Puts each declared tensor's bytes back in its `data` (for a reply the caller forwards)."""
        for tensor, chunked_id in self.declared:
            tensor.data = bytes(self.buffers.pop(chunked_id))
            tensor.ClearField("external_data")


async def call_encode(stub: encoder_pb2_grpc.EncoderServiceStub, request: encoder_pb2.EncodeRequest,
                      timeout_s: float, metadata, *,
                      max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> encoder_pb2.EncodeResponse:
    """One Encode through StreamEncode: the reply put back together, tensors inline (or shared-memory
    handles, when the request asked for them). Failed calls raise grpc.aio.AioRpcError as Encode's do;
    a reply whose chunks do not add up is INTERNAL (TENSOR_CHUNK_INVALID / TENSOR_CHUNKS_INCOMPLETE).
    An encoder without StreamEncode (UNIMPLEMENTED: another implementation of v1) is called with Encode."""
    call = stub.StreamEncode(encoder_pb2.StreamEncodeRequest(request=request, max_chunk_bytes=max_chunk_bytes),
                             timeout=timeout_s, metadata=metadata)
    try:
        return await _assemble_reply(call)
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    return await stub.Encode(request, timeout=timeout_s, metadata=metadata)


async def _assemble_reply(call) -> encoder_pb2.EncodeResponse:
    response = encoder_pb2.EncodeResponse()
    assembler = Assembler(error=Internal)
    first = True
    async for message in call:
        if message.items:
            if not first:
                raise Internal("the encoder's StreamEncode reply has items after its first message",
                               reason="TENSOR_CHUNK_INVALID", metadata={"chunkedId": "0"})
            response.items.extend(message.items)
            assembler.declare(item_tensors(response.items))
        first = False
        assembler.add(message.chunks)
    if assembler.tensors:  # copying a large reply's bytes is CPU work: not on the event loop
        await asyncio.to_thread(lambda: assembler.finish().inline())
    return response


async def receive_generate_request(
        messages: AsyncIterator[llm_pb2.ChunkedStreamGenerateRequest],
        check: Callable[[llm_pb2.StreamGenerateRequest], None] | None = None,
) -> tuple[llm_pb2.StreamGenerateRequest, Assembler]:
    """A ChunkedStreamGenerate stream read to its end: the request and its chunks (call `finish()` off the
    event loop: it copies the bytes together). `check` sees the request before any chunk is kept."""
    request: llm_pb2.StreamGenerateRequest | None = None
    assembler = Assembler(error=InvalidArgument)
    async for message in messages:
        if message.HasField("request"):
            if request is not None:
                raise InvalidArgument("a ChunkedStreamGenerate stream sets request twice; send it in the first "
                                      "message only", reason="TENSOR_CHUNK_INVALID", metadata={"chunkedId": "0"})
            request = message.request
            if check is not None:
                check(request)
            assembler.declare(prompt_tensors(request.prompt))
        elif request is None:
            raise InvalidArgument("a ChunkedStreamGenerate stream must start with its request",
                                  reason="TENSOR_CHUNK_INVALID", metadata={"chunkedId": "0"})
        assembler.add(message.chunks)
    if request is None:
        raise InvalidArgument("the ChunkedStreamGenerate stream ended without a request",
                              reason="TENSOR_CHUNKS_INCOMPLETE",
                              metadata={"chunkedId": "0", "expectedBytes": "0", "receivedBytes": "0"})
    return request, assembler
