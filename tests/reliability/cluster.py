"""Encoder replicas, an LLM and a processor as separate processes, each of which a test may kill, stop
and start again on its own port: what the fault and shutdown tests share."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.client import build_messages
from services.common.api.triptych.common.v1 import generation_pb2
from services.common.api.triptych.processor.v1 import processor_pb2, processor_pb2_grpc
from tests.procs import Proc, start_encoder, start_llm, start_processor, stop_all, wait_listening, wait_serving

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def port_of(address: str) -> str:
    return address.rsplit(":", 1)[1]


@dataclass
class Cluster:
    """`flags` go to every service (e.g. --drain-s); the processor gets every encoder as a replica."""

    model: Path
    encoders: list[Proc]
    llm: Proc
    processor: Proc
    flags: tuple[str, ...] = ()
    retired: list[Proc] = field(default_factory=list)  # killed or stopped ones, for the failure output

    @classmethod
    def start(cls, model: Path, encoders: int = 1, *flags: str) -> Cluster:
        started = [start_encoder(model, *flags) for _ in range(encoders)]
        llm = start_llm(model, *flags)
        addresses = [wait_listening(p) for p in started]
        extra = [x for a in addresses[1:] for x in ("--encoder", a)]
        processor = start_processor(model, addresses[0], wait_listening(llm), None, *extra, *flags)
        cluster = cls(model, started, llm, processor, flags)
        wait_listening(processor)
        for proc in cluster.procs:
            wait_serving(proc.address)
        return cluster

    @property
    def procs(self) -> list[Proc]:
        return [*self.encoders, self.llm, self.processor]

    def stop(self) -> None:
        """SIGTERM to all at once, then waits for each: their drains and exits overlap."""
        stop_all(*self.procs)

    def restart_encoder(self, index: int) -> Proc:
        """The encoder `index` again, on its old port (it must have exited)."""
        return self._restart(self.encoders[index], lambda port: start_encoder(self.model, *self.flags, "--port", port),
                             lambda proc: self.encoders.__setitem__(index, proc))

    def restart_llm(self) -> Proc:
        return self._restart(self.llm, lambda port: start_llm(self.model, *self.flags, "--port", port),
                             lambda proc: setattr(self, "llm", proc))

    def restart_processor(self) -> Proc:
        extra = [x for e in self.encoders[1:] for x in ("--encoder", e.address)]
        return self._restart(self.processor, lambda port: start_processor(
            self.model, self.encoders[0].address, self.llm.address, None, *extra, *self.flags, "--port", port),
            lambda proc: setattr(self, "processor", proc))

    def _restart(self, old: Proc, start: Callable[[str], Proc], put: Callable[[Proc], None]) -> Proc:
        assert old.popen.poll() is not None, f"{old.name} still runs"
        self.retired.append(old)
        proc = start(port_of(old.address))
        put(proc)
        assert wait_listening(proc) == old.address
        wait_serving(proc.address)
        return proc


def request(prompt: str, images: list[bytes], max_new_tokens: int) -> processor_pb2.StreamGenerateRequest:
    return processor_pb2.StreamGenerateRequest(messages=build_messages(prompt, images),
                                               sampling=generation_pb2.SamplingParams(max_new_tokens=max_new_tokens))


@dataclass
class Stream:
    """One StreamGenerate call read on its own thread: its tokens, its end (completion or error), when."""

    tokens: list[int] = field(default_factory=list)
    completion: processor_pb2.Completion | None = None
    error: grpc.RpcError | None = None
    first_token: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    ended_at: float = 0.0  # time.monotonic() at its end

    @property
    def code(self) -> grpc.StatusCode:
        return self.error.code() if self.error is not None else grpc.StatusCode.OK


def start_stream(address: str, req: processor_pb2.StreamGenerateRequest, timeout_s: float) -> Stream:
    """Starts the call now; the caller waits on `first_token` (in flight) and `done`."""
    stream = Stream()

    def read() -> None:
        with grpc.insecure_channel(address) as channel:
            call = processor_pb2_grpc.ProcessorServiceStub(channel).StreamGenerate(req, timeout=timeout_s)
            try:
                for reply in call:
                    stream.tokens += reply.token_ids
                    if stream.tokens:
                        stream.first_token.set()
                    if reply.HasField("completion"):
                        stream.completion = reply.completion
            except grpc.RpcError as err:
                stream.error = err
            finally:
                stream.ended_at = time.monotonic()
                stream.first_token.set()
                stream.done.set()

    threading.Thread(target=read, daemon=True).start()
    return stream


def generate(address: str, req: processor_pb2.StreamGenerateRequest, timeout_s: float = 60) -> list[int]:
    """One whole stream's tokens; raises its error."""
    stream = start_stream(address, req, timeout_s)
    assert stream.done.wait(timeout_s + 10), "the stream outlived its deadline"
    if stream.error is not None:
        raise stream.error
    assert stream.completion is not None and list(stream.completion.token_ids) == stream.tokens
    return stream.tokens


@dataclass
class HealthTrace:
    """What a probe polling one address sees after a signal: when health first said NOT_SERVING and when
    the address first refused the probe (the listener closed), both in seconds from `started`."""

    started: float
    not_serving_s: float | None = None
    refused_s: float | None = None


def trace_health(address: str, service: str = "", timeout_s: float = 30, period_s: float = 0.02) -> HealthTrace:
    """Polls `address`'s health from now until it refuses (or `timeout_s`): as a load balancer's probe."""
    trace = HealthTrace(time.monotonic())
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() - trace.started < timeout_s:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
                if status == NOT_SERVING and trace.not_serving_s is None:
                    trace.not_serving_s = time.monotonic() - trace.started
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    trace.refused_s = time.monotonic() - trace.started
                    return trace
            time.sleep(period_s)
    return trace


def recover(address: str, req: processor_pb2.StreamGenerateRequest, timeout_s: float = 30) -> tuple[list[int], float]:
    """Sends `req` until it is answered (UNAVAILABLE meanwhile: a channel reconnecting, at most its 2 s
    backoff); returns the answer and the seconds it took. Any other error fails."""
    started = time.monotonic()
    while True:
        try:
            return generate(address, req), time.monotonic() - started
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - started > timeout_s:
                raise
        time.sleep(0.1)
