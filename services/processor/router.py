"""Clients of the encoder and LLM services: connection, model and dtype checks, errors, deadlines.

Every call carries the current request's x-request-id, so the three services' logs join on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc

from services.common import chunks, metrics
from services.common.api.triptych.common.v1 import model_info_pb2, tensor_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2, encoder_pb2_grpc
from services.common.api.triptych.llm.v1 import llm_pb2, llm_pb2_grpc
from services.common.config import ServerConfig
from services.common.errors import DeadlineExceeded, FailedPrecondition, Unavailable, from_rpc_error
from services.common.interceptors import outgoing_metadata
from services.common.server import channel_options, open_channel
from services.common.tls import ClientTLS

log = logging.getLogger(__name__)

# gRPC's reconnect backoff grows to 120 s by default: an encoder replica or the LLM back after a crash would
# wait that long (seen: the LLM restarted after a kill -9 was refused for its whole backoff; issue 18).
RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 500), ("grpc.min_reconnect_backoff_ms", 500),
                     ("grpc.max_reconnect_backoff_ms", 2000))


class Downstream:
    """One channel to an encoder or LLM service, checked to serve our model."""

    def __init__(self, service: str, address: str, stub_class, fingerprint: str,
                 extra_options: Sequence[tuple[str, int]] = (), tls: ClientTLS | None = None,
                 server_name: str | None = None):
        self.service = service
        self.address = address
        self.fingerprint = fingerprint
        self.channel = open_channel(address, [*channel_options(), *extra_options], tls=tls, server_name=server_name)
        self.stub = stub_class(self.channel)

    async def connect(self, timeout_s: float) -> model_info_pb2.ModelInfo:
        """Waits until the service answers, checks that it serves the same model, returns its ModelInfo."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                reply = await self.stub.GetModelInfo(self._info_request(), timeout=max(0.1, deadline - loop.time()),
                                                     wait_for_ready=True)
                break
            except grpc.aio.AioRpcError as err:
                if loop.time() >= deadline:
                    raise Unavailable(f"{self.service} at {self.address} did not answer within {timeout_s:.0f} s: "
                                      f"{err.details()}", reason=f"{self.service.upper()}_UNAVAILABLE") from err
                await asyncio.sleep(0.2)
        served = reply.model_info.fingerprint
        if served != self.fingerprint:
            raise FailedPrecondition(
                f"{self.service} at {self.address} serves model {served} ({reply.model_info.model_path}), "
                f"the processor serves {self.fingerprint}; start all services with the same --model",
                reason="MODEL_FINGERPRINT_MISMATCH")
        log.info("%s at %s serves model %s", self.service, self.address, served)
        return reply.model_info

    def _info_request(self):
        return (encoder_pb2.GetModelInfoRequest() if self.service == "encoder" else llm_pb2.GetModelInfoRequest())

    def translate(self, err: grpc.aio.AioRpcError):
        return from_rpc_error(err, self.service, self.address)

    async def close(self) -> None:
        await self.channel.close()


class EncoderClient(Downstream):
    """`max_message_bytes`: the largest reply message we take (the processor's --max-message-mib); a larger
    reply comes in chunks of StreamEncode."""

    def __init__(self, address: str, fingerprint: str, extra_options: Sequence[tuple[str, int]] = (),
                 max_message_bytes: int = ServerConfig.max_message_mib << 20, tls: ClientTLS | None = None,
                 server_name: str | None = None):
        super().__init__("encoder", address, encoder_pb2_grpc.EncoderServiceStub, fingerprint, extra_options,
                         tls, server_name)
        self.chunk_bytes = chunks.chunk_budget(max_message_bytes)

    async def encode(self, request: encoder_pb2.EncodeRequest, timeout_s: float) -> encoder_pb2.EncodeResponse:
        if timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before encoding", reason="DEADLINE_EXCEEDED")
        try:  # StreamEncode: a reply of any size arrives in messages our channel takes
            return await chunks.call_encode(self.stub, request, timeout_s, outgoing_metadata(),
                                            max_chunk_bytes=self.chunk_bytes)
        except grpc.aio.AioRpcError as err:
            raise self.translate(err) from err


class LlmClient(Downstream):
    """`max_message_bytes`: the largest message the LLM takes (the processor assumes its own
    --max-message-mib); a larger request goes in chunks through ChunkedStreamGenerate."""

    def __init__(self, address: str, fingerprint: str, max_message_bytes: int = ServerConfig.max_message_mib << 20,
                 tls: ClientTLS | None = None):
        super().__init__("llm", address, llm_pb2_grpc.LlmServiceStub, fingerprint, RECONNECT_OPTIONS, tls=tls)
        self.chunk_bytes = chunks.chunk_budget(max_message_bytes)

    async def stream_generate(self, request: llm_pb2.StreamGenerateRequest,
                              timeout_s: float) -> AsyncIterator[llm_pb2.StreamGenerateResponse]:
        if timeout_s <= 0:
            raise DeadlineExceeded("the request's deadline passed before generation", reason="DEADLINE_EXCEEDED")
        tensors = [t for _, t in chunks.prompt_tensors(request.prompt)]
        metrics.count_sent(metrics.LLM_REQUEST, metrics.tensor_bytes(tensors))
        if chunks.fits_one_message(tensors, self.chunk_bytes):
            call = self.stub.StreamGenerate(request, timeout=timeout_s, metadata=outgoing_metadata())
        else:  # cutting a large request copies its bytes: not on the event loop
            messages = await asyncio.to_thread(chunks.split_generate_request, request, self.chunk_bytes)
            call = self.stub.ChunkedStreamGenerate(iter(messages), timeout=timeout_s, metadata=outgoing_metadata())
        try:
            async for response in call:
                yield response if isinstance(response, llm_pb2.StreamGenerateResponse) else response.response
        except grpc.aio.AioRpcError as err:
            raise self.translate(err) from err
        finally:
            call.cancel()  # a stop string or a gone client ends the LLM's work too


def dtype_name(wire: int) -> str:
    """tensor_pb2.DATA_TYPE_BFLOAT16 -> "bfloat16", as the --dtype flag spells it."""
    return tensor_pb2.DataType.Name(wire).removeprefix("DATA_TYPE_").lower()


def check_embedding_dtypes(processor_dtype: int, encoder: tuple[str, model_info_pb2.ModelInfo],
                           llm: tuple[str, model_info_pb2.ModelInfo]) -> None:
    """The encoder must send embeddings in the dtype the LLM takes (and the processor reports).

    The LLM refuses embeddings of another dtype rather than casting them, so a mismatch
    would fail every media request: refuse at start-up instead.
    """
    (encoder_addr, encoder_info), (llm_addr, llm_info) = encoder, llm
    enc, lm, own = (dtype_name(d) for d in (encoder_info.embedding_dtype, llm_info.embedding_dtype, processor_dtype))
    metadata = {"encoderDtype": enc, "llmDtype": lm, "processorDtype": own}
    if enc != lm:
        raise FailedPrecondition(
            f"the encoder at {encoder_addr} makes {enc} embeddings but the LLM at {llm_addr} takes {lm}; "
            "start all services with the same --dtype", reason="SERVICE_DTYPE_MISMATCH", metadata=metadata)
    if own != enc:
        raise FailedPrecondition(
            f"the encoder and the LLM use {enc} embeddings but the processor was started with --dtype {own}; "
            "start all services with the same --dtype", reason="SERVICE_DTYPE_MISMATCH", metadata=metadata)
