"""What the fuzz tests call: the three services in this process, every RPC of the contract, valid
seed requests for each, and the checks that each call and the whole run must pass.

RPCs are found in the service descriptors (a new RPC is fuzzed with no change here); seeds are made
the way a client and a router make them (Preprocess, then Encode), so near-valid requests are one
mutation away from a request that succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from services.common import chunks, shm
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.encoder.v1 import encoder_pb2
from services.common.api.triptych.llm.v1 import llm_pb2
from services.common.api.triptych.processor.v1 import processor_pb2
from services.common.errors import REASONS, error_info
from services.common.tensors import from_proto, to_proto
from services.models.base import AUDIO, VIDEO
from tests.inproc import InProcessServices
from tests.media import audio_bytes, image_bytes, video_bytes
from tests.reliability.protofuzz import Dictionary

PROTO_MODULES = (processor_pb2, encoder_pb2, llm_pb2)
# Every RPC of the contract, found in the descriptors: (service's short name, method).
RPCS: list[tuple[str, MethodDescriptor]] = [
    (service.name.removesuffix("Service").lower(), method)
    for module in PROTO_MODULES for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
RPC_BY_ID = {f"{service}.{method.name}": (service, method) for service, method in RPCS}
CALL_TIMEOUT_S = float(os.environ.get("TRIPTYCH_FUZZ_TIMEOUT_S", "5"))
# A status that is not a bug: the service ran out of memory (and said so).
OUT_OF_MEMORY_REASONS = frozenset(r for r in REASONS if r.endswith("OUT_OF_MEMORY"))


def rpc_id(rpc: tuple[str, MethodDescriptor]) -> str:
    return f"{rpc[0]}.{rpc[1].name}"


def _png_frames(count: int) -> list[bytes]:
    return [image_bytes(48, 40, seed=70 + i, kind="gradient") for i in range(count)]


class ErrorLog(logging.Handler):
    """Log records at ERROR or with a traceback (an exception that escaped a handler, a task that died),
    and exceptions that ended a thread."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(f"{record.name}: {self.format(record)}")

    def thread_hook(self, args: threading.ExceptHookArgs) -> None:
        self.records.append(f"thread {args.thread.name if args.thread else '?'}: {args.exc_type.__name__}: "
                            f"{args.exc_value}")

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        return taken


@dataclass
class Outcome:
    code: grpc.StatusCode
    reason: str  # ErrorInfo.reason, "" when the status has none
    details: str
    seconds: float


@dataclass(repr=False)
class FuzzTarget:
    services: InProcessServices
    media_dir: Path
    errors: ErrorLog
    seeds: dict[str, list] = field(default_factory=dict)  # request type's full name -> valid requests (lists: streams)
    words: Dictionary = field(default_factory=Dictionary)
    outcomes: Counter = field(default_factory=Counter)  # (rpc, code name, reason) -> calls
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    baseline: dict[str, int] = field(default_factory=dict)  # snapshot() once seeded (warmed up)
    started_s: float = 0.0
    rss_trend: list[int] = field(default_factory=list)  # this process's RSS (MiB) every 500 calls

    def __repr__(self) -> str:  # a failure's report prints the test's arguments: not the seeds' bytes
        return f"FuzzTarget({self.services.address})"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis's printer
        printer.text(repr(self))

    # ---- calling any RPC ------------------------------------------------------------------------
    def address(self, service: str) -> str:
        return {"processor": self.services.address, "encoder": self.services.encoder_address,
                "llm": self.services.llm_address}[service]

    def _stub(self, service: str, method: MethodDescriptor):
        channel = self.channels.get(service)
        if channel is None:
            channel = self.channels[service] = grpc.insecure_channel(self.address(service))
        response_cls = message_factory.GetMessageClass(method.output_type)
        kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
                (True, False): channel.stream_unary, (True, True): channel.stream_stream}[
            (method.client_streaming, method.server_streaming)]
        return kind(f"/{method.containing_service.full_name}/{method.name}",
                    request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_cls.FromString)

    def call_ok(self, service: str, name: str, request: Message) -> Message:
        """A unary call that must succeed (making seeds); its reply."""
        method = next(m for s, m in RPCS if s == service and m.name == name)
        return self._stub(service, method)(request, timeout=60)

    def call(self, service: str, method: MethodDescriptor, request: Message | list[Message]) -> Outcome:
        stub = self._stub(service, method)
        start = time.monotonic()
        try:
            reply = stub(iter(request) if method.client_streaming else request, timeout=CALL_TIMEOUT_S)
            if method.server_streaming:
                for _ in reply:
                    pass
            return Outcome(grpc.StatusCode.OK, "", "", time.monotonic() - start)
        except grpc.RpcError as err:
            info = error_info(err)
            return Outcome(err.code(), info.reason if info else "", err.details() or "", time.monotonic() - start)

    def check(self, service: str, method: MethodDescriptor, request: Message | list[Message]) -> Outcome:
        """The property every call must hold: it ends within its deadline, with success or a clean status
        (a code that is not UNKNOWN or INTERNAL, and an ErrorInfo with a reason of the contract), and
        nothing is logged as an error or escapes as an exception meanwhile."""
        outcome = self.call(service, method, request)
        self.outcomes[(f"{service}.{method.name}", outcome.code.name, outcome.reason)] += 1
        if sum(self.outcomes.values()) % 500 == 0:
            self.rss_trend.append(_rss_mib("self"))
        what = f"{service}.{method.name} -> {outcome.code.name} {outcome.reason}: {outcome.details[:500]}"
        assert outcome.seconds < CALL_TIMEOUT_S + 2, f"{what} after {outcome.seconds:.1f} s: the deadline did not end it"
        # Give a handler's late log lines (a task that dies after the reply) a moment to arrive.
        logged = self.errors.take()
        assert not logged, f"{what}; the services logged errors:\n" + "\n".join(logged)
        if outcome.code in (grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED):
            return outcome  # DEADLINE_EXCEEDED: the client's own deadline (a long generation); work freed: see growth
        if outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in outcome.details:
            return outcome  # gRPC's own refusal of a message over --max-message-mib, before any handler runs
        assert outcome.code != grpc.StatusCode.UNKNOWN, what
        assert outcome.code != grpc.StatusCode.INTERNAL or outcome.reason in OUT_OF_MEMORY_REASONS, \
            f"{what}: an INTERNAL status is a bug"
        assert outcome.reason in REASONS, f"{what}: no ErrorInfo reason of the contract"
        return outcome

    # ---- the service's state, before and after ----------------------------------------------------
    def snapshot(self) -> dict[str, int]:
        """Resources that a leak grows: this process's RSS (MiB), threads, open fds, event-loop tasks; the
        requests the LLM's engine holds (asked of the engine process) and its client still tracks."""
        async def count_tasks() -> int:
            return len(asyncio.all_tasks()) - 1  # not this one

        llm, encoder = self.services.llm, self.services.encoder
        fds = _fd_targets()
        memfds = [t for t in fds if t.startswith(f"/memfd:{shm.PREFIX}")]
        return {
            "rss_mib": _rss_mib("self"),
            "engine_rss_mib": _rss_mib(str(llm.engine.pid)),
            "threads": len(os.listdir("/proc/self/task")),
            # The encoder's shared-memory regions are fds until read or past their TTL (30 s): counted apart.
            "fds": len(fds) - len(memfds),
            "shm_fds": len(memfds),
            "shm_regions": encoder._shm.num_regions,
            "tasks": asyncio.run_coroutine_threadsafe(count_tasks(), self.services.loop).result(30),
            "engine_requests": llm.engine.engine_in_flight(),
            "engine_client_requests": llm.engine.num_in_flight,
            "encoder_queued_items": encoder.batcher.queued_items,
            "encoder_cache_mib": encoder.cache.used_bytes >> 20,  # bounded by --cache-mib; part of rss_mib
            "engine_pid": llm.engine.pid,
        }

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def _fd_targets() -> list[str]:
    targets = []
    for name in os.listdir("/proc/self/fd"):
        try:
            targets.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:  # closed meanwhile (the listing's own fd)
            pass
    return targets


def _rss_mib(pid: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    return 0


# ---- seeds: valid requests of every RPC ---------------------------------------------------------------
SAMPLINGS = [
    generation_pb2.SamplingParams(max_new_tokens=3),
    generation_pb2.SamplingParams(max_new_tokens=4, temperature=0.8, top_p=0.9, top_k=8, seed=7, min_p=0.05,
                                  repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    generation_pb2.SamplingParams(max_new_tokens=3, logprobs=True, top_logprobs=2, stop_token_ids=[5],
                                  ignore_eos=True),
]


def _chat(*parts: processor_pb2.ContentPart, system: bool = False) -> list[processor_pb2.ChatMessage]:
    messages = [processor_pb2.ChatMessage(role="system", content=[processor_pb2.ContentPart(text="Be brief.")])]
    messages = messages if system else []
    messages.append(processor_pb2.ChatMessage(role="user", content=[*parts, processor_pb2.ContentPart(text="Say.")]))
    return messages


def build_seeds(target: FuzzTarget) -> None:
    """Valid requests for every RPC, each checked to succeed; and the dictionary of values worth trying."""
    services, family = target.services, target.services.processor.family
    image, other = image_bytes(64, 48, seed=1), image_bytes(40, 56, seed=2, kind="gradient", fmt="JPEG")
    (target.media_dir / "image.png").write_bytes(image)
    (target.media_dir / "link.png").symlink_to("/etc/hostname")
    part = processor_pb2.ContentPart
    media = processor_pb2.Media
    chats = [_chat(system=True), _chat(part(image=media(data=image))),
             _chat(part(image=media(url=f"file://{target.media_dir / 'image.png'}")), part(image=media(data=other)))]
    clips: list[bytes] = []
    if VIDEO in family.modalities:
        clips.append(video_bytes(seconds=1.0, fps=4, width=64, height=48))
        chats.append(_chat(part(video=media(data=clips[-1], video_options=processor_pb2.VideoOptions(fps=2)))))
        chats.append(_chat(part(video=media(frames=processor_pb2.VideoFrames(frames=_png_frames(2), fps=2)))))
    if AUDIO in family.modalities:
        clips.append(audio_bytes(seconds=0.5))
        chats.append(_chat(part(audio=media(data=clips[-1]))))

    processor_requests = [processor_pb2.GenerateRequest(messages=chat, sampling=SAMPLINGS[i % len(SAMPLINGS)])
                          for i, chat in enumerate(chats)]
    encode, generate = [], []
    for request in processor_requests:  # as a router does: Preprocess, Encode, then the LLM
        pre = target.call_ok("processor", "Preprocess", processor_pb2.PreprocessRequest.FromString(
            request.SerializeToString()))
        llm_request = pre.llm_request
        if pre.encode_request.items:
            encode.append(pre.encode_request)
            encoded = target.call_ok("encoder", "Encode", pre.encode_request)
            by_hash = {item.mm_hash: item for item in encoded.items}
            for mm in llm_request.prompt.multimodal_inputs:
                item = by_hash[mm.placeholder.mm_hash]
                rows = slice(mm.placeholder.embedding_offset, mm.placeholder.embedding_offset + mm.placeholder.length)
                mm.embeddings.CopyFrom(to_proto(from_proto(item.embeddings)[rows]))
                mm.deepstack_embeddings.extend(to_proto(from_proto(d)[rows]) for d in item.deepstack_embeddings)
        generate.append(llm_request)
    if encode and family.num_deepstack_layers == 0:  # an image as its embeddings (no deepstack: a simple seed)
        encoded = target.call_ok("encoder", "Encode", encode[0])
        processor_requests.append(processor_pb2.GenerateRequest(messages=_chat(part(image=media(
            uuid="mine", embeddings=processor_pb2.MediaEmbeddings(embeddings=encoded.items[0].embeddings,
                                                                  width_px=64, height_px=48)))),
            sampling=SAMPLINGS[0]))
    shm_request = encoder_pb2.EncodeRequest()
    shm_request.CopyFrom(encode[0])
    shm_request.embeddings_transport = encoder_pb2.EMBEDDINGS_TRANSPORT_SHARED_MEMORY
    reference = encoder_pb2.EncodeRequest(model_fingerprint=encode[0].model_fingerprint,
                                          items=[encoder_pb2.MediaItem(modality=encode[0].items[0].modality,
                                                                       mm_hash=encode[0].items[0].mm_hash)])
    encode += [shm_request, reference]

    def streams(requests: list[Message], cls) -> list[Message]:
        return [cls.FromString(r.SerializeToString()) for r in requests]

    target.seeds = {
        "triptych.processor.v1.GenerateRequest": processor_requests,
        "triptych.processor.v1.StreamGenerateRequest": streams(processor_requests, processor_pb2.StreamGenerateRequest),
        "triptych.processor.v1.PreprocessRequest": streams(processor_requests, processor_pb2.PreprocessRequest),
        "triptych.encoder.v1.EncodeRequest": encode,
        "triptych.encoder.v1.StreamEncodeRequest": [encoder_pb2.StreamEncodeRequest(request=r, max_chunk_bytes=size)
                                                    for r in encode for size in (0, 4096)],
        "triptych.llm.v1.GenerateRequest": generate,
        "triptych.llm.v1.StreamGenerateRequest": streams(generate, llm_pb2.StreamGenerateRequest),
        "triptych.llm.v1.ChunkedStreamGenerateRequest": [
            chunks.split_generate_request(r, 4096) for r in streams(generate, llm_pb2.StreamGenerateRequest)],
    }
    for service, method in RPCS:  # every seed succeeds: a near-valid request is one mutation from success
        for seed in target.seeds.get(method.input_type.full_name, []):
            outcome = target.call(service, method, seed)
            assert outcome.code == grpc.StatusCode.OK, (rpc_id((service, method)), outcome)

    tensor_bytes = [t.data for r in generate for mm in r.prompt.multimodal_inputs for t in [mm.embeddings][:1]]
    target.words = Dictionary(
        strings=(services.processor.checkpoint.fingerprint, *services.processor.reserved_tokens,
                 *(item.mm_hash for r in encode for item in r.items), f"file://{target.media_dir / 'image.png'}",
                 f"file://{target.media_dir / 'link.png'}", f"file://{target.media_dir}", "pixel_values",
                 "image_grid_thw", "video_grid_thw", "input_features"),
        blobs=(image, other, image[:100], image[:8] + b"\0" * 64, _gif(), _webp(), *clips,
               *(clip[: len(clip) // 2] for clip in clips), *_png_frames(1), *tensor_bytes[:1],
               np.full(16, np.nan, dtype=np.float32).tobytes()),
    )


def _gif() -> bytes:
    return image_bytes(30, 20, seed=3, fmt="GIF")


def _webp() -> bytes:
    return image_bytes(30, 20, seed=4, fmt="WEBP")
