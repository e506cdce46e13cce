"""Starting Triptych services as separate processes, the way a user does."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_LISTENING = re.compile(r"(\w+) listening on (\S+)")


@dataclass
class Proc:
    """One `triptych` child process whose output is kept for failure messages."""

    name: str
    popen: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def output(self) -> str:
        return "".join(self.lines[-60:])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        self.signal(sig)
        return self.wait(timeout_s)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout_s: float = 60) -> int:
        """Its exit code; killed after `timeout_s`."""
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            # Shown in pytest's warnings summary: a service that outlives its signal costs every run this wait.
            warnings.warn(f"{self.name} was still running {timeout_s:g} s after its signal: killed", stacklevel=2)
            self.popen.kill()
            self.popen.wait()
        return self.popen.returncode


def stop_all(*procs: Proc, timeout_s: float = 60) -> list[int]:
    """SIGTERM to every process at once, then their exit codes. Their exits overlap: each service takes
    1-3 s of interpreter and torch teardown after it stopped serving, so a set stopped one by one took
    5-12 s of every test module's teardown."""
    for proc in procs:
        proc.signal()
    return [proc.wait(timeout_s) for proc in procs]


def spawn(name: str, *argv: str, listen_name: str | None = None, wrapper: tuple[str, ...] = ()) -> Proc:
    """`wrapper`: a command the service runs under, e.g. ("unshare", "--pid", "--fork", "--kill-child")."""
    popen = subprocess.Popen([*wrapper, sys.executable, "-m", "services.cli", *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1)
    proc = Proc(name, popen)
    expected = listen_name or name

    def pump() -> None:
        for line in popen.stdout:
            proc.lines.append(line)
            match = _LISTENING.search(line)
            if match and match.group(1) == expected and not line.startswith("["):
                proc.address = match.group(2)
                proc.ready.set()
        proc.ready.set()

    threading.Thread(target=pump, daemon=True).start()
    return proc


def wait_listening(proc: Proc, timeout_s: float = 300) -> str:
    if not proc.ready.wait(timeout_s) or proc.address is None:
        proc.stop(signal.SIGKILL)
        raise RuntimeError(f"{proc.name} did not start:\n{proc.output()}")
    return proc.address


def wait_serving(address: str, timeout_s: float = 60, credentials: grpc.ChannelCredentials | None = None) -> None:
    """`credentials`: for a service that serves TLS (tls_flags)."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"{address} not SERVING")


def start_encoder(model: Path, *flags: str) -> Proc:
    return spawn("encoder", "serve", "encoder", "--model", str(model), "--port", "0", *flags)


def start_llm(model: Path, *flags: str) -> Proc:
    return spawn("llm", "serve", "llm", "--model", str(model), "--port", "0", *flags)


def start_processor(model: Path, encoder: str, llm: str, allowed_media_dir: Path | None = None, *flags: str) -> Proc:
    extra = ["--allowed-media-dir", str(allowed_media_dir)] if allowed_media_dir else []
    return spawn("processor", "serve", "processor", "--model", str(model), "--port", "0",
                 "--encoder", encoder, "--llm", llm, *extra, *flags)


def tls_flags(cert: Path, key: Path, ca: Path | None = None) -> tuple[str, ...]:
    """A service's flags to serve TLS with `cert`, mutual TLS (client certificates signed by `ca`) with `ca`."""
    return ("--tls-cert", str(cert), "--tls-key", str(key), *(("--tls-ca", str(ca)) if ca else ()))


@dataclass
class ServiceSet:
    encoder: Proc
    llm: Proc
    processor: Proc

    @property
    def address(self) -> str:
        return self.processor.address

    def stop(self) -> None:
        stop_all(self.processor, self.encoder, self.llm)  # the processor signalled first: it calls the others


def start_services(model: Path, allowed_media_dir: Path | None = None, *flags: str) -> ServiceSet:
    """Encoder, LLM and processor as processes; `flags` go to all three (e.g. "--dtype", "bfloat16")."""
    encoder, llm = start_encoder(model, *flags), start_llm(model, *flags)
    processor = start_processor(model, wait_listening(encoder), wait_listening(llm), allowed_media_dir, *flags)
    wait_listening(processor)
    for proc in (encoder, llm, processor):
        wait_serving(proc.address)
    return ServiceSet(encoder, llm, processor)


def engine_pid(service_pid: int) -> int:
    """The LLM service's engine process: its child running services.llm.engine_process."""
    for task in Path(f"/proc/{service_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            if b"services.llm.engine_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise AssertionError(f"no engine process under {service_pid}")
