"""`triptych up`: encoder, LLM and processor (and, with --front-port, the HTTP front) as child
processes on loopback.

Each child listens on the port it is given (0 = free port) and prints
"NAME listening on HOST:PORT"; we read that line, pass the addresses on, wait
for health SERVING on all three, then print the processor's line (and the front's,
once it has the processor's model). SIGINT or SIGTERM stops them all (each finishes
its in-flight requests).

The machine's cores are split between the two torch processes (the encoder and the LLM's engine
process) unless --torch-threads says otherwise; the processor's torch (image resizing in its
preprocess threads) runs single-threaded, so three torch processes never each take every core.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import EncoderConfig, FrontConfig, LlmConfig, ProcessorConfig
from services.common.errors import TriptychError
from services.common.flags import child_argv
from services.common.tls import ClientTLS

_LISTENING = re.compile(r"^(\w+) listening on (\S+)$")


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "services.cli", *argv], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env={**os.environ, **(env or {})})
        self.address: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        """Forwards the child's output to our stderr; notes its listening address."""
        for line in self.proc.stdout:
            match = _LISTENING.match(line.strip())
            if match and match.group(1) == self.name:
                self.address = match.group(2)
                self._ready.set()
            sys.stderr.write(f"[{self.name}] {line}")
        self._ready.set()  # exited

    def wait_address(self, timeout_s: float) -> str:
        if not self._ready.wait(timeout_s) or self.address is None:
            raise RuntimeError(f"{self.name} did not start (exit code {self.proc.poll()}); see its output above")
        return self.address

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)


def _health_channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    return grpc.secure_channel(address, tls.credentials()) if tls else grpc.insecure_channel(address)


def _wait_serving(address: str, timeout_s: float, tls: ClientTLS | None = None) -> None:
    with _health_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5, wait_for_ready=True)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{address} is not SERVING after {timeout_s:.0f} s")
            time.sleep(0.2)


def torch_shares(torch_threads: int, cores: int, encoders: int = 1) -> tuple[int, int]:
    """(each encoder's, LLM) torch threads: the user's --torch-threads for all, or the cores split in two
    (the LLM gets the odd one: it decodes every request's every token), the encoders' half shared
    between the encoder replicas; at least one each."""
    if torch_threads > 0:
        return torch_threads, torch_threads
    encoder = max(1, cores // 2)
    return max(1, encoder // encoders), max(1, cores - encoder)


def run_up(args: argparse.Namespace) -> int:
    # Each child gets every one of its config fields as a flag, so `up --X` reaches whoever has X.
    skip = frozenset({"port", "encoder_addrs", "llm_addr", "metrics_port", "health_port"})
    # --metrics-port P: the processor P, the LLM P+1, the encoders P+2, P+3, ..., then the front
    metrics = [[] if not args.metrics_port else ["--metrics-port", str(args.metrics_port + i)]
               for i in range(args.encoders + 3)]
    # With --tls-cert the children serve TLS: our health checks use the processor's client side.
    try:
        tls = (ClientTLS.from_files(args.tls_upstream_ca, args.tls_client_cert, args.tls_client_key, enabled=True)
               if args.tls_cert else None)
    except TriptychError as err:
        print(f"error: [{err.reason}] {err.message}", file=sys.stderr)
        return 2
    children: list[Child] = []
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.encoders < 1:
        print("error: --encoders must be at least 1", file=sys.stderr)
        return 2
    encoder_threads, llm_threads = torch_shares(args.torch_threads, os.cpu_count() or 2, args.encoders)
    torch_skip = skip | {"torch_threads"}  # each gets its own share below
    try:
        encoders = [Child("encoder", ["serve", "encoder", *child_argv(EncoderConfig, args, skip=torch_skip),
                                      "--port", "0", "--torch-threads", str(encoder_threads), *metrics[2 + i]])
                    for i in range(args.encoders)]
        llm = Child("llm", ["serve", "llm", *child_argv(LlmConfig, args, skip=torch_skip), "--port", "0",
                            "--torch-threads", str(llm_threads), *metrics[1]])
        children += [*encoders, llm]
        encoder_flags = [x for e in encoders for x in ("--encoder", e.wait_address(600))]
        llm_addr = llm.wait_address(600)
        processor = Child("processor", ["serve", "processor", *child_argv(ProcessorConfig, args, skip=skip),
                                        "--port", str(args.port), *encoder_flags, "--llm", llm_addr, *metrics[0]],
                          env={"OMP_NUM_THREADS": "1"})
        children.append(processor)
        processor_addr = processor.wait_address(600)
        for child in children:
            _wait_serving(child.address, 60, tls)
        print(f"processor listening on {processor_addr}", flush=True)
        if args.front_port is not None:
            # The front sends the processor the token the processor wants, unless told another.
            upstream_token = ([] if args.upstream_auth_token_file or not args.auth_token_file else
                              ["--upstream-auth-token-file", str(args.auth_token_file)])
            front = Child("front", ["serve", "front", *child_argv(FrontConfig, args, skip=skip | {"processor_addr"}),
                                    "--port", str(args.front_port), "--processor", processor_addr,
                                    *upstream_token, *metrics[-1]])
            children.append(front)
            print(f"front listening on {front.wait_address(args.connect_timeout_s + 60)}", flush=True)
        while not stop.is_set():
            if any(c.proc.poll() is not None for c in children):
                dead = [c.name for c in children if c.proc.poll() is not None]
                print(f"error: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
            stop.wait(0.5)
        return 0
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        for child in children:
            child.stop()
        for child in children:
            try:
                child.proc.wait(timeout=args.drain_s + args.grace_s + 10)  # each child drains, then finishes
            except subprocess.TimeoutExpired:
                child.proc.kill()
