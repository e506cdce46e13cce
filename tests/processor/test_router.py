"""services/processor/router.py against real grpc.aio servers with scripted servicers.

The servers are the encoder's and the LLM's production builders; the servicers answer
what each test needs (another model, an error, an endless stream), with no model loaded.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from services.common import chunks
from services.common.api.triptych.common.v1 import model_info_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import ServerConfig
from services.common.errors import (DeadlineExceeded, FailedPrecondition, InvalidArgument, TriptychError,
                                    Unavailable)
from services.common.interceptors import REQUEST_ID_KEY, bind_request_id
from services.common.tensors import from_proto, to_proto
from services.encoder.server import start_server as start_encoder
from services.llm.server import start_server as start_llm
from services.processor.router import EncoderClient, LlmClient, check_embedding_dtypes, dtype_name

FP = "00112233aabbccdd"
F32, BF16 = tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_BFLOAT16


def _info(fingerprint: str = FP, dtype: int = F32) -> model_info_pb2.ModelInfo:
    return model_info_pb2.ModelInfo(fingerprint=fingerprint, embedding_dtype=dtype, model_path="/m")


class ScriptedEncoder(encoder_pb2_grpc.EncoderServiceServicer):
    def __init__(self, info: model_info_pb2.ModelInfo, error: TriptychError | None = None):
        self.info, self.error, self.metadata = info, error, []

    async def GetModelInfo(self, request, context):
        return encoder_pb2.GetModelInfoResponse(model_info=self.info)

    async def Encode(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        if self.error:
            raise self.error
        return encoder_pb2.EncodeResponse(items=[encoder_pb2.ItemEmbeddings(mm_hash=i.mm_hash) for i in request.items])

    async def StreamEncode(self, request, context):  # what the processor calls: one message, as Encode's reply
        yield encoder_pb2.StreamEncodeResponse(items=(await self.Encode(request.request, context)).items)


class EndlessLlm(llm_pb2_grpc.LlmServiceServicer):
    def __init__(self):
        self.cancelled = asyncio.Event()
        self.metadata = []

    async def GetModelInfo(self, request, context):
        return llm_pb2.GetModelInfoResponse(model_info=_info())

    async def StreamGenerate(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        try:
            token = 0
            while True:
                token += 1
                yield llm_pb2.StreamGenerateResponse(token_ids=[token])
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


def run(coro):
    return asyncio.run(coro)


async def _with_encoder(servicer, body):
    server, _ = await start_encoder(servicer, ServerConfig(port=0))
    client = EncoderClient(server.address, FP)
    try:
        return await body(client)
    finally:
        await client.close()
        await server.stop(0)


def test_connect_returns_the_model_info():
    async def body(client):
        info = await client.connect(10)
        assert info.fingerprint == FP and info.embedding_dtype == BF16
    run(_with_encoder(ScriptedEncoder(_info(dtype=BF16)), body))


def test_another_model_is_failed_precondition():
    async def body(client):
        with pytest.raises(FailedPrecondition) as caught:
            await client.connect(10)
        assert caught.value.reason == "MODEL_FINGERPRINT_MISMATCH" and "ffff" in caught.value.message
    run(_with_encoder(ScriptedEncoder(_info(fingerprint="ffff000011112222")), body))


def test_nothing_listening_is_unavailable_after_the_timeout():
    async def body():
        client = EncoderClient("127.0.0.1:1", FP)
        try:
            with pytest.raises(Unavailable) as caught:
                await client.connect(0.5)
            assert caught.value.reason == "ENCODER_UNAVAILABLE" and "127.0.0.1:1" in caught.value.message
        finally:
            await client.close()
    run(body())


def test_encode_keeps_the_encoders_error_and_names_it():
    async def body(client):
        with pytest.raises(InvalidArgument) as caught:
            await client.encode(encoder_pb2.EncodeRequest(), 10)
        assert caught.value.reason == "ENCODER_INPUT_INVALID" and caught.value.domain == "triptych.encoder"
        assert caught.value.message.startswith("encoder: ")
    run(_with_encoder(ScriptedEncoder(_info(), InvalidArgument("bad grid", reason="ENCODER_INPUT_INVALID")), body))


def test_a_spent_deadline_is_not_sent():
    encoder = ScriptedEncoder(_info())

    async def body(client):
        with pytest.raises(DeadlineExceeded):
            await client.encode(encoder_pb2.EncodeRequest(), 0)
        assert encoder.metadata == []
    run(_with_encoder(encoder, body))


def test_encode_carries_the_current_request_id():
    encoder = ScriptedEncoder(_info())

    async def body(client):
        await client.encode(encoder_pb2.EncodeRequest(), 10)  # outside a call: no id to pass on
        bind_request_id("rid-42")
        await client.encode(encoder_pb2.EncodeRequest(items=[encoder_pb2.MediaItem(mm_hash="h")]), 10)
    run(_with_encoder(encoder, body))
    assert REQUEST_ID_KEY not in encoder.metadata[0]
    assert encoder.metadata[1][REQUEST_ID_KEY] == "rid-42"


def test_leaving_a_stream_early_cancels_the_llms_work_and_passes_the_request_id():
    llm = EndlessLlm()

    async def body():
        server, _ = await start_llm(llm, ServerConfig(port=0))
        client = LlmClient(server.address, FP)
        try:
            await client.connect(10)
            bind_request_id("rid-stream")
            stream = client.stream_generate(llm_pb2.StreamGenerateRequest(), 30)
            async for reply in stream:
                if reply.token_ids[0] == 3:
                    break
            await stream.aclose()  # what a stop string or a gone client does
            await asyncio.wait_for(llm.cancelled.wait(), 10)
        finally:
            await client.close()
            await server.stop(0)
    run(body())
    assert llm.metadata[0][REQUEST_ID_KEY] == "rid-stream"


def test_embedding_dtypes_must_agree():
    check_embedding_dtypes(F32, ("e:1", _info()), ("l:2", _info()))
    with pytest.raises(FailedPrecondition) as caught:
        check_embedding_dtypes(F32, ("e:1", _info(dtype=BF16)), ("l:2", _info()))
    err = caught.value
    assert err.reason == "SERVICE_DTYPE_MISMATCH" and "bfloat16" in err.message and "float32" in err.message
    assert err.metadata == {"encoderDtype": "bfloat16", "llmDtype": "float32", "processorDtype": "float32"}
    with pytest.raises(FailedPrecondition) as caught:
        check_embedding_dtypes(F32, ("e:1", _info(dtype=BF16)), ("l:2", _info(dtype=BF16)))
    assert "--dtype float32" in caught.value.message
    assert dtype_name(tensor_pb2.DATA_TYPE_FLOAT16) == "float16"


# ---- embeddings over the message limit: chunks both ways ----

LIMIT_BYTES = 1 << 20  # the processor's --max-message-mib 1


def _rows(rows: int, seed: int) -> tensor_pb2.Tensor:
    return to_proto(torch.randn(rows, 64, generator=torch.Generator().manual_seed(seed)))


class ChunkingEncoder(ScriptedEncoder):
    """Answers StreamEncode as the encoder does: 5,000-row embeddings (1.3 MB), in chunks under the limit."""

    def __init__(self):
        super().__init__(_info())
        self.budgets: list[int] = []

    async def StreamEncode(self, request, context):
        self.budgets.append(request.max_chunk_bytes)
        reply = encoder_pb2.EncodeResponse(items=[encoder_pb2.ItemEmbeddings(mm_hash=i.mm_hash, embeddings=_rows(5000, n))
                                                  for n, i in enumerate(request.request.items)])
        for message in chunks.split_encode_response(reply, request.max_chunk_bytes):
            assert message.ByteSize() <= LIMIT_BYTES
            yield message


def test_a_reply_over_the_limit_comes_in_chunks_and_whole():
    encoder = ChunkingEncoder()

    async def body():
        server, _ = await start_encoder(encoder, ServerConfig(port=0))
        client = EncoderClient(server.address, FP, max_message_bytes=LIMIT_BYTES)
        try:
            request = encoder_pb2.EncodeRequest(items=[encoder_pb2.MediaItem(mm_hash=h) for h in ("a", "b")])
            return await client.encode(request, 30)
        finally:
            await client.close()
            await server.stop(0)

    reply = run(body())
    assert encoder.budgets == [chunks.chunk_budget(LIMIT_BYTES)]
    assert [i.mm_hash for i in reply.items] == ["a", "b"]
    for n, item in enumerate(reply.items):
        assert item.embeddings == _rows(5000, n)  # inline again, bit for bit


class EncodeOnly(encoder_pb2_grpc.EncoderServiceServicer):
    """Another implementation of v1's EncoderService, older than StreamEncode (UNIMPLEMENTED)."""

    async def Encode(self, request, context):
        return encoder_pb2.EncodeResponse(items=[encoder_pb2.ItemEmbeddings(mm_hash=i.mm_hash) for i in request.items])


def test_an_encoder_without_stream_encode_is_called_with_encode():
    async def body():
        server = grpc.aio.server()  # a plain server, not ours
        encoder_pb2_grpc.add_EncoderServiceServicer_to_server(EncodeOnly(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        client = EncoderClient(f"127.0.0.1:{port}", FP)
        try:
            return await client.encode(encoder_pb2.EncodeRequest(items=[encoder_pb2.MediaItem(mm_hash="h")]), 10)
        finally:
            await client.close()
            await server.stop(0)
    assert [i.mm_hash for i in run(body()).items] == ["h"]


class ChunkReceivingLlm(EndlessLlm):
    def __init__(self):
        super().__init__()
        self.received: list[torch.Tensor] = []

    async def ChunkedStreamGenerate(self, request_iterator, context):
        request, assembler = await chunks.receive_generate_request(request_iterator)
        assembled = assembler.finish()
        self.received = [from_proto(mm.embeddings, external={"chunked_id": assembled})
                         for mm in request.prompt.multimodal_inputs]
        yield llm_pb2.ChunkedStreamGenerateResponse(response=llm_pb2.StreamGenerateResponse(token_ids=[7]))


def test_a_request_over_the_limit_goes_in_chunks():
    llm = ChunkReceivingLlm()

    async def body():
        server, _ = await start_llm(llm, ServerConfig(port=0, max_message_mib=1))
        client = LlmClient(server.address, FP, max_message_bytes=LIMIT_BYTES)
        try:
            small = llm_pb2.StreamGenerateRequest(prompt=llm_pb2.Prompt(multimodal_inputs=[
                llm_pb2.MultimodalInput(embeddings=_rows(10, 0))]))
            stream = client.stream_generate(small, 30)  # fits: the plain StreamGenerate
            first = await anext(stream)
            await stream.aclose()
            large = llm_pb2.StreamGenerateRequest(prompt=llm_pb2.Prompt(multimodal_inputs=[
                llm_pb2.MultimodalInput(embeddings=_rows(5000, 1)), llm_pb2.MultimodalInput(embeddings=_rows(30, 2))]))
            return first, [reply async for reply in client.stream_generate(large, 30)]
        finally:
            await client.close()
            await server.stop(0)

    first, replies = run(body())
    assert first.token_ids and len(llm.metadata) == 1  # the small one went to EndlessLlm's StreamGenerate
    assert [list(r.token_ids) for r in replies] == [[7]]
    assert [t.shape[0] for t in llm.received] == [5000, 30]
    assert torch.equal(llm.received[0], from_proto(_rows(5000, 1)))
