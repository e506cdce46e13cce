"""The LLM engine's own process (as vLLM's EngineCore): loads the model, runs `Engine`, speaks to
the LLM service over one duplex pipe.

The service's gRPC loop and this process share no GIL: a torch step never stalls the loop, a crash
here fails the requests in flight instead of the service, and no torch thread lives in the service.

Protocol (pickled dataclasses over a socket pair, multiprocessing Connections, in order):
  parent -> child: EngineSpec first, then Submit (then, with `shm_size` > 0, one file descriptor), Abort, Probe, Stop
  child -> parent: Hello once the model is loaded (or StartFailed), then lists of Output and ProbeReply

A request's tensors (token ids, embeddings, position inputs) travel in one anonymous shared-memory
file (Linux `memfd_create`) whose descriptor is passed over the pipe (SCM_RIGHTS): the bytes are
written once by the service and mapped here, never pickled or piped. The file has no name, so
nothing can leak: the kernel frees it when the last descriptor and mapping close — the service
closes its own right after sending, this process when the engine drops the request's inputs, and
either side dying closes its share. Without memfd (not Linux) the same bytes ride in the message.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path

import torch

from services.common.errors import TriptychError
from services.llm.engine import Engine, Finished
from services.llm.sampling import SamplingSpec

log = logging.getLogger(__name__)


# ---- what the child needs to build its engine ---------------------------------------------------
@dataclass(frozen=True)
class EngineSpec:
    model: Path
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str
    max_running: int
    max_waiting: int
    max_batch_tokens: int
    torch_threads: int  # intra-op threads of this process (>= 1)


# ---- tensors in shared memory -------------------------------------------------------------------
@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a request's shared block."""

    offset: int  # bytes from the start of the block
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class PlacedRef:
    """A PlacedEmbeddings whose tensors are in the shared block."""

    modality: str
    offset: int
    length: int
    embeddings: TensorRef
    deepstack: tuple[TensorRef, ...]
    position_inputs: dict[str, TensorRef]
    kept: TensorRef | None = None  # EVS: the rows' indexes into the unpruned video


# ---- messages -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    request_id: int  # the service's id
    token_ids: TensorRef
    placed: tuple[PlacedRef, ...]
    sampling: SamplingSpec
    shm_size: int  # > 0: a file descriptor of this many bytes follows on the pipe
    inline: bytes | None = None  # the block itself where memfd is not available


@dataclass(frozen=True)
class Abort:
    request_id: int


@dataclass(frozen=True)
class Probe:
    """Asks how many requests the engine holds (tests; the service counts its own without asking)."""

    token: int


@dataclass(frozen=True)
class Stop:
    """Ends the engine: requests still in it fail with UNAVAILABLE (LLM_SHUTTING_DOWN)."""


@dataclass(frozen=True)
class Hello:
    pid: int
    vocab_size: int  # rows of the input embedding table (may exceed the tokenizer's)


@dataclass(frozen=True)
class StartFailed:
    message: str


@dataclass(frozen=True)
class Error:
    """A TriptychError, rebuilt on the service's side (exceptions with keyword-only fields do not pickle)."""

    cls: type[TriptychError]
    message: str
    reason: str
    metadata: dict[str, str]

    @staticmethod
    def of(err: TriptychError) -> Error:
        return Error(type(err), err.message, err.reason, dict(err.metadata))

    def exception(self) -> TriptychError:
        return self.cls(self.message, reason=self.reason, metadata=self.metadata)


@dataclass(frozen=True)
class Output:
    """One engine event of a request: SampledToken, Finished or Error."""

    request_id: int
    event: object


@dataclass(frozen=True)
class ProbeReply:
    token: int
    num_in_flight: int


def tensor_from(block: memoryview | mmap.mmap | bytes, ref: TensorRef) -> torch.Tensor:
    """A view of `ref` in `block` (no copy; the tensor keeps the mapping alive)."""
    dtype = getattr(torch, ref.dtype)
    count = 1
    for dim in ref.shape:
        count *= dim
    if count == 0:
        return torch.empty(ref.shape, dtype=dtype)
    return torch.frombuffer(block, dtype=dtype, count=count, offset=ref.offset).view(ref.shape)


# ---- the child's main ----------------------------------------------------------------------------
def main(conn: Connection) -> None:
    """Entry point of the engine process: `python -m services.llm.engine_process FD`."""
    # The service decides when the engine stops: a Ctrl-C or SIGTERM to the process group must not
    # kill requests the service is still finishing. A dead service closes the pipe: we exit then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from services.common.interceptors import setup_logging

    setup_logging()
    spec: EngineSpec = conn.recv()
    torch.set_num_threads(spec.torch_threads)
    torch.set_num_interop_threads(1)  # eager decode forks no inter-op work; one idle pool thread, not N
    try:
        engine, vocab_size = _load(spec)
    except Exception as err:
        log.exception("engine process: loading %s failed", spec.model)
        conn.send(StartFailed(f"{type(err).__name__}: {err}"))
        return
    conn.send(Hello(os.getpid(), vocab_size))
    log.info("engine process %d: %s loaded, %d torch threads", os.getpid(), spec.model.name, spec.torch_threads)
    _Serve(engine, conn).run()
    # Everything is answered and sent: exit without the interpreter's teardown of torch and the model
    # (~1 s, which the LLM service waits for at every stop and restart); the kernel frees the rest.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _load(spec: EngineSpec) -> tuple[Engine, int]:
    """The engine over the family's language model, and the model's vocabulary size."""
    from services.models.registry import family_for

    family = family_for(spec.model)
    model = family.load_model(spec.model, getattr(torch, spec.dtype), spec.device)
    family.strip_for_llm(model)
    # The service admits at most max_running + max_waiting. A request it aborted still counts here
    # until the engine's next step drops it, so the engine's own bound leaves room for as many again.
    engine = Engine(family, model, spec.max_running, spec.max_running + 2 * spec.max_waiting,
                    max_batch_tokens=spec.max_batch_tokens)
    return engine, model.get_input_embeddings().num_embeddings


class _Serve:
    """Reads the service's messages on this thread; one sender thread writes the engine's events
    back in batches (one pipe write per engine step, not per token)."""

    def __init__(self, engine: Engine, conn: Connection):
        self.engine = engine
        self.conn = conn
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.engine_ids: dict[int, int] = {}  # service's request id -> engine's, while it runs
        self.ended: set[int] = set()  # requests that ended before their submit returned
        self.lock = threading.Lock()
        self.sender = threading.Thread(target=self._send_loop, name="engine-sender")

    def run(self) -> None:
        self.sender.start()
        try:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):  # the service went away without a Stop
                    break
                if isinstance(message, Stop):
                    break
                self._handle(message)
        finally:
            self.engine.stop()  # fails what is left (LLM_SHUTTING_DOWN) through `emit`
            self.outbox.put(None)
            self.sender.join()

    def _handle(self, message: object) -> None:
        if isinstance(message, Submit):
            self._submit(message)
        elif isinstance(message, Abort):
            with self.lock:
                engine_id = self.engine_ids.get(message.request_id)
            if engine_id is not None:
                self.engine.abort(engine_id)
        elif isinstance(message, Probe):
            self.outbox.put(ProbeReply(message.token, self.engine.num_in_flight))

    def _submit(self, message: Submit) -> None:
        block = message.inline
        if message.shm_size:
            fd = recv_handle(self.conn)
            try:
                block = mmap.mmap(fd, message.shm_size)
            finally:
                os.close(fd)  # the mapping holds the memory now
        request_id = message.request_id
        placed = [_placed(block, p) for p in message.placed]

        def emit(event: object) -> None:
            if isinstance(event, TriptychError):
                event = Error.of(event)
            if isinstance(event, (Error, Finished)):
                with self.lock:
                    if self.engine_ids.pop(request_id, None) is None:
                        self.ended.add(request_id)  # ended before `submit` returned its id
            self.outbox.put(Output(request_id, event))

        try:
            engine_id = self.engine.submit(tensor_from(block, message.token_ids), placed, message.sampling, emit)
        except TriptychError as err:
            self.outbox.put(Output(request_id, Error.of(err)))
            return
        with self.lock:
            if request_id in self.ended:
                self.ended.discard(request_id)
            else:
                self.engine_ids[request_id] = engine_id

    def _send_loop(self) -> None:
        while True:
            batch = [self.outbox.get()]
            while not self.outbox.empty():
                batch.append(self.outbox.get())
            done = batch[-1] is None
            batch = [item for item in batch if item is not None]
            if batch:
                try:
                    self.conn.send(batch)
                except OSError:  # the service is gone; nothing to tell
                    return
            if done:
                return


def _placed(block, ref: PlacedRef):
    from services.models.base import ItemEmbeddings, PlacedEmbeddings

    return PlacedEmbeddings(
        modality=ref.modality, offset=ref.offset, length=ref.length,
        embeddings=ItemEmbeddings(tensor_from(block, ref.embeddings),
                                  tuple(tensor_from(block, d) for d in ref.deepstack)),
        position_inputs={name: tensor_from(block, t) for name, t in ref.position_inputs.items()},
        kept=None if ref.kept is None else tensor_from(block, ref.kept),
    )


if __name__ == "__main__":
    # Run the module's importable copy: messages pickle by module name, `__main__.Hello` would not load.
    from services.llm import engine_process  # noqa: PLW0406

    engine_process.main(Connection(int(sys.argv[1])))
