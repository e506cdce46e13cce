"""The LLM service's side of the engine process (as vLLM's AsyncMPClient): admission, per-request
asyncio queues fed by one reader thread, crash detection and restart.

- Admission happens here, without asking the engine: at most `max_in_flight` requests (running +
  queued); one more is RESOURCE_EXHAUSTED at once, with a retry hint (google.rpc.RetryInfo).
- A request whose consumer goes away (cancelled RPC, deadline) is aborted: the engine drops its row
  and cache at its next step.
- The engine process exiting (crash, OOM kill) fails its requests with UNAVAILABLE
  (LLM_ENGINE_CRASHED) and starts a new one; until it has loaded the model, new requests are
  UNAVAILABLE (LLM_ENGINE_RESTARTING) with a retry hint.
- `stop()` ends the process and joins this side's threads; none of them runs torch.

Threads here: "llm-engine-client" reads the engine's events (and restarts it), "llm-engine-send"
writes requests (packing a request's tensors into shared memory off the event loop).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from pathlib import Path

import torch

from services.common.errors import Internal, ResourceExhausted, TriptychError, Unavailable
from services.llm.engine import Finished, events_until_finished, shutting_down
from services.llm.engine_process import (
    Abort,
    EngineSpec,
    Error,
    Hello,
    Output,
    PlacedRef,
    Probe,
    ProbeReply,
    StartFailed,
    Stop,
    Submit,
    TensorRef,
)
from services.llm.sampling import SampledToken, SamplingSpec
from services.models.base import PlacedEmbeddings

log = logging.getLogger(__name__)

RETRY_DELAY_S = 1.0  # the hint a refused caller gets: about one engine step budget and then some
_ALIGN = 64  # bytes: each tensor of a shared block starts on a cache line
_HAS_MEMFD = hasattr(os, "memfd_create")


@dataclass
class _Pending:
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue


def _exit_description(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class EngineClient:
    def __init__(self, spec: EngineSpec, *, start_timeout_s: float = 600.0):
        self.spec = spec
        self.max_in_flight = spec.max_running + spec.max_waiting
        self.start_timeout_s = start_timeout_s
        self.vocab_size = 0  # from the engine's Hello
        self._requests: dict[int, _Pending] = {}
        self._probes: dict[int, Future] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()  # _requests, _probes, _ready, the connection
        self._send_lock = threading.Lock()  # a Submit and its file descriptor go out together
        self._stopping = threading.Event()
        self._ready = False
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-engine-send")
        self._reader: threading.Thread | None = None
        self.restarts = 0
        # Called on the reader thread with False when the engine dies and True once a new one has
        # loaded the model (the server turns it into health NOT_SERVING / SERVING).
        self.on_ready: Callable[[bool], None] | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine process and returns once it has loaded the model (raises otherwise)."""
        self._conn, self._proc, hello = self._spawn()
        self.vocab_size = hello.vocab_size
        self._ready = True
        # A daemon only so that an owner who forgets stop() does not hang interpreter exit (joining
        # it would wait on the engine, which waits on us); the atexit hook then stops the engine.
        # stop() joins it; it never runs torch.
        self._reader = threading.Thread(target=self._supervise, name="llm-engine-client", daemon=True)
        self._reader.start()
        atexit.register(self.stop)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ends the engine (requests still in it fail with LLM_SHUTTING_DOWN) and joins our threads."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._stopping.set()
            conn = self._conn
        atexit.unregister(self.stop)
        try:
            self._sender.submit(self._send, conn, Stop())  # after the requests already on their way
        except RuntimeError:  # at interpreter exit the executor takes no more work
            self._send(conn, Stop())
        if self._reader is not None:
            self._reader.join(timeout_s)
            if self._reader.is_alive():  # the engine did not stop in time
                self._kill()
                self._reader.join(10)
        self._sender.shutdown(wait=True)
        self._fail_all(shutting_down())

    @property
    def num_in_flight(self) -> int:
        """Requests admitted and not yet finished, failed or aborted (known here, not asked)."""
        return len(self._requests)

    @property
    def pid(self) -> int | None:
        """The engine process's id (for logs and tests)."""
        return self._proc.pid if self._proc is not None else None

    def engine_in_flight(self, timeout_s: float = 10.0) -> int:
        """How many requests the engine process itself still holds (asks it; tests and debugging)."""
        token, future = next(self._ids), Future()
        with self._lock:
            self._probes[token] = future
            conn = self._conn
        self._sender.submit(self._send, conn, Probe(token))
        return future.result(timeout_s)

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, token_ids: torch.Tensor, placed: list[PlacedEmbeddings],
                       sampling: SamplingSpec) -> AsyncIterator[SampledToken | Finished]:
        """Yields the generated tokens one by one, then a Finished event; errors are raised."""
        events: asyncio.Queue = asyncio.Queue()
        request_id, conn = self._admit(asyncio.get_running_loop(), events)
        try:
            self._sender.submit(self._send_submit, conn, request_id, token_ids, placed, sampling)
        except RuntimeError:  # stop() shut the sender down since admission
            raise shutting_down() from None
        try:
            async for event in events_until_finished(events):
                yield event
        finally:
            with self._lock:
                still_running = self._requests.pop(request_id, None) is not None
            if still_running:  # the consumer went away (cancelled RPC, deadline): free its row
                try:
                    self._sender.submit(self._send, conn, Abort(request_id))
                except RuntimeError:  # stopped meanwhile: the engine is gone with the request
                    pass

    def _admit(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> tuple[int, Connection]:
        with self._lock:
            if self._stopping.is_set():
                raise shutting_down()
            if not self._ready:
                raise Unavailable("the LLM engine is restarting after a crash; retry in a few seconds",
                                  reason="LLM_ENGINE_RESTARTING", retry_delay_s=RETRY_DELAY_S)
            if len(self._requests) >= self.max_in_flight:
                raise ResourceExhausted(
                    f"the LLM has {len(self._requests)} requests in flight (limit {self.max_in_flight}: "
                    f"{self.spec.max_running} running + {self.spec.max_waiting} queued); retry later",
                    reason="LLM_QUEUE_FULL", metadata={"maxInFlightRequests": str(self.max_in_flight)},
                    retry_delay_s=RETRY_DELAY_S)
            request_id = next(self._ids)
            self._requests[request_id] = _Pending(loop, events)
            return request_id, self._conn

    # ---- sender thread -----------------------------------------------------------------------
    def _send(self, conn: Connection | None, message: object, fd: int | None = None) -> None:
        """Writes one message (and a descriptor after it); a dead engine is the reader's to report."""
        if conn is None:
            return
        try:
            with self._send_lock:
                conn.send(message)
                if fd is not None:
                    send_handle(conn, fd, self._proc.pid)
        except (OSError, ValueError):  # closed or broken pipe: the reader sees the exit and fails requests
            pass

    def _send_submit(self, conn: Connection, request_id: int, token_ids: torch.Tensor,
                     placed: list[PlacedEmbeddings], sampling: SamplingSpec) -> None:
        """Packs the request's tensors into one shared block (one copy) and sends its descriptor."""
        try:
            block = _Block()
            ids_ref = block.add(token_ids)
            refs = tuple(PlacedRef(
                modality=p.modality, offset=p.offset, length=p.length,
                embeddings=block.add(p.embeddings.embeddings),
                deepstack=tuple(block.add(d) for d in p.embeddings.deepstack),
                position_inputs={name: block.add(t) for name, t in p.position_inputs.items()},
                kept=None if p.kept is None else block.add(p.kept),
            ) for p in placed)
            fd, inline = block.write()
        except Exception as err:
            log.exception("request %d: packing its tensors failed", request_id)
            self._deliver_to(request_id, Internal(f"could not hand the request to the engine: {err}",
                                                  reason="ENGINE_ERROR"))
            return
        try:
            self._send(conn, Submit(request_id, ids_ref, refs, sampling, block.size if fd is not None else 0,
                                    inline), fd)
        finally:
            if fd is not None:
                os.close(fd)  # in flight in the socket, or the engine has its own: ours can go

    # ---- reader thread -----------------------------------------------------------------------
    def _supervise(self) -> None:
        """Reads the engine's events; when the engine exits, fails its requests and restarts it."""
        while True:
            self._read(self._conn)
            proc = self._proc
            _wait(proc, 10 if self._stopping.is_set() else 2)
            hung = proc.poll() is None  # it closed the pipe but does not exit
            _kill(proc)
            if self._stopping.is_set():
                return
            why = "stopped answering" if hung else _exit_description(proc.returncode)
            log.error("the LLM engine process %d %s; failing its requests and restarting it", proc.pid, why)
            with self._lock:
                self._ready = False
            self._notify(False)
            self._fail_all(Unavailable(
                f"the LLM engine process {why} while this request was in flight; it is restarting, retry",
                reason="LLM_ENGINE_CRASHED", metadata={"exitCode": str(proc.returncode)},
                retry_delay_s=RETRY_DELAY_S))
            if not self._restart():
                return

    def _read(self, conn: Connection) -> None:
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                return
            except Exception:  # a message we cannot read: the stream is lost, so is the engine
                log.exception("unreadable message from the LLM engine process; restarting it")
                self._kill()
                return
            deliveries: list[tuple[_Pending, object]] = []
            with self._lock:
                for item in batch:
                    if isinstance(item, ProbeReply):
                        future = self._probes.pop(item.token, None)
                        if future is not None:
                            future.set_result(item.num_in_flight)
                        continue
                    event = _event(item)
                    final = isinstance(event, (Finished, BaseException))
                    pending = self._requests.pop(item.request_id, None) if final else self._requests.get(item.request_id)
                    if pending is not None:  # None: aborted here already
                        deliveries.append((pending, event))
            _deliver(deliveries)

    def _restart(self) -> bool:
        delay_s = 1.0
        while not self._stopping.is_set():
            try:
                conn, proc, _ = self._spawn()
            except TriptychError as err:
                log.error("restarting the LLM engine failed: %s; retrying in %.0f s", err.message, delay_s)
                self._stopping.wait(delay_s)
                delay_s = min(delay_s * 2, 30.0)
                continue
            with self._lock:
                old = self._conn
                self._conn, self._proc = conn, proc
                self._ready = not self._stopping.is_set()
                self.restarts += 1
            old.close()
            if self._stopping.is_set():  # stop() came while we were loading: it sent Stop to the old pipe
                self._send(conn, Stop())
                continue  # the loop above reads the new engine to its end, then joins it
            log.info("the LLM engine process restarted (pid %d)", proc.pid)
            self._notify(True)
            return True
        return self._proc.poll() is None

    # ---- helpers ---------------------------------------------------------------------------------
    def _spawn(self) -> tuple[Connection, subprocess.Popen, Hello]:
        """A new engine process, once it says the model is loaded.

        A fresh interpreter (`python -m services.llm.engine_process FD`), as multiprocessing's
        'spawn' but without re-importing the caller's __main__: never a fork of a process that has
        gRPC threads. It talks over one socket pair (a multiprocessing Connection each side).
        """
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "services.llm.engine_process", str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], env=env)
        theirs.close()  # the child holds its end: its exit is our EOF
        conn = Connection(ours.detach())
        conn.send(self.spec)
        waited_s = 0.0
        while not conn.poll(0.5):
            waited_s += 0.5
            if self._stopping.is_set() or waited_s > self.start_timeout_s:
                _kill(proc)
                conn.close()
                raise Unavailable(f"the LLM engine did not load the model within {waited_s:.0f} s",
                                  reason="LLM_ENGINE_START_FAILED")
        try:
            hello = conn.recv()
        except EOFError:
            _wait(proc, 10)
            hello = StartFailed(f"the engine process {_exit_description(proc.returncode)}")
        if isinstance(hello, StartFailed):
            _wait(proc, 10)
            conn.close()
            raise Unavailable(f"the LLM engine could not load {self.spec.model}: {hello.message}",
                              reason="LLM_ENGINE_START_FAILED")
        return conn, proc, hello

    def _notify(self, ready: bool) -> None:
        if self.on_ready is not None:
            try:
                self.on_ready(ready)
            except Exception:
                log.exception("on_ready(%s) failed", ready)

    def _kill(self) -> None:
        if self._proc is not None:
            _kill(self._proc)

    def _fail_all(self, error: TriptychError) -> None:
        with self._lock:
            failed = list(self._requests.values())
            self._requests.clear()
            probes = list(self._probes.values())
            self._probes.clear()
        _deliver([(pending, error) for pending in failed])
        for future in probes:
            future.set_exception(error)

    def _deliver_to(self, request_id: int, event: object) -> None:
        with self._lock:
            pending = self._requests.pop(request_id, None)
        if pending is not None:
            _deliver([(pending, event)])


_ROOT = str(Path(__file__).resolve().parents[2])  # the folder holding `services`, for the child's imports


def _wait(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        pass


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _event(output: Output) -> object:
    event = output.event
    if isinstance(event, Error):
        if event.reason == "LLM_QUEUE_FULL":  # the engine's own bound (a race with aborts): retryable
            return ResourceExhausted(event.message, reason="LLM_QUEUE_FULL", metadata=event.metadata,
                                     retry_delay_s=RETRY_DELAY_S)
        return event.exception()
    return event


def _deliver(deliveries: list[tuple[_Pending, object]]) -> None:
    """One hop onto each event loop for a batch of events (one engine step's tokens)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = defaultdict(list)
    for pending, event in deliveries:
        by_loop[pending.loop].append((pending.events, event))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, pairs)
        except RuntimeError:  # that loop has closed: nobody is waiting any more
            pass


def _put_all(pairs: list[tuple[asyncio.Queue, object]]) -> None:
    for events, event in pairs:
        events.put_nowait(event)


class _Block:
    """A request's tensors laid out in one shared-memory block."""

    def __init__(self):
        self.size = 0
        self.tensors: list[tuple[int, torch.Tensor]] = []

    def add(self, tensor: torch.Tensor) -> TensorRef:
        offset = -(-self.size // _ALIGN) * _ALIGN
        flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self.tensors.append((offset, flat))
        self.size = offset + flat.numel()
        return TensorRef(offset, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    def write(self) -> tuple[int | None, bytes | None]:
        """(memfd, None) on Linux; (None, the bytes) where there is no memfd."""
        size = max(self.size, 1)
        if not _HAS_MEMFD:
            buffer = bytearray(size)
            self._fill(memoryview(buffer))
            return None, bytes(buffer)
        fd = os.memfd_create("triptych-llm-request", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as mapped:
                self._fill(mapped)
        except BaseException:
            os.close(fd)
            raise
        self.size = size
        return fd, None

    def _fill(self, target) -> None:
        for offset, flat in self.tensors:
            if flat.numel():
                target[offset:offset + flat.numel()] = flat.numpy()
