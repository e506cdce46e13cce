"""Embeddings in shared memory between an encoder and an LLM on one host (opt-in).

A region is a memfd (Linux anonymous shared memory) named "triptych-emb-<token>", owned by the
encoder process that wrote it; the handle (Tensor.shm) names the owner's host, pid, fd and token. Its
lifetime is tied to processes, so nothing outlives them:
- the reader (the LLM) opens /proc/<pid>/fd/<fd>, checks that the file is the memfd of that token
  (an fd number can be reused), copies the bytes with pread (never mmap: a region truncated under a
  mapping would SIGBUS the reader), then truncates the region to 0 bytes: its memory is free at once,
  and the owner sees the claim (size 0) and closes its fd;
- the owner closes every region that nobody claimed within its time to live (`ttl_s`);
- a dead owner's fds close with it, and with them the regions: there is no file under /dev/shm and
  no name to sweep. A handle to them is FAILED_PRECONDITION (SHM_REGION_UNAVAILABLE), as is one
  from another host (boot ids differ) or another user / PID namespace.
A region serves one reader, once: the reader takes every tensor of a request from it, then claims it.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

PREFIX = "triptych-emb-"
_ALIGN = 64  # bytes: each tensor of a region starts on a cache line
_TOKEN = re.compile(r"[0-9a-f]{32}")
_MAX_IO = 1 << 30  # bytes per read/write call (Linux moves at most ~2 GiB per call)
AVAILABLE = hasattr(os, "memfd_create") and Path("/proc/self/fd").is_dir()


def host_id() -> str:
    """This host's Linux boot id: equal for every process (and container) of one running kernel."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass
class _Region:
    fd: int
    size: int
    expires_at: float  # time.monotonic()
    # False while its export sizes and writes it (outside the lock): an empty region is not yet a claimed
    # one. Reaping it then closed its fd, a concurrent export's memfd took the same fd number, and this
    # export's bytes went into that other request's region (issue 18: an answer from another image).
    written: bool = False


class Exporter:
    """The owner's side (the encoder): moves tensors' bytes into regions, frees unclaimed ones after
    `ttl_s`, holds at most `max_bytes` unclaimed at once (beyond that, tensors stay inline)."""

    def __init__(self, ttl_s: float, max_bytes: int):
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.host_id = host_id()
        self._regions: dict[str, _Region] = {}  # token -> region, until claimed or expired
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return AVAILABLE and self.max_bytes > 0

    def export(self, tensors: list[tensor_pb2.Tensor]) -> bool:
        """Moves the inline tensors' bytes into one new region and sets their `shm` handles (data
        cleared). False, tensors untouched, when shared memory is off, its budget spent, or the host out
        of memory for it."""
        tensors = [t for t in tensors if t.WhichOneof("external_data") is None]
        if not self.enabled or not tensors:
            return False
        datas = [t.data for t in tensors]  # each access copies out of the message: once
        offsets, size = [], 0
        for data in datas:
            size = -(-size // _ALIGN) * _ALIGN
            offsets.append(size)
            size += len(data)
        size = max(size, 1)
        with self._lock:
            self._reap_locked()
            if self.live_bytes + size > self.max_bytes:
                log.info("shared memory full (%d of %d bytes unclaimed): %d bytes go inline",
                         self.live_bytes, self.max_bytes, size)
                return False
            token = secrets.token_hex(16)
            try:
                fd = os.memfd_create(PREFIX + token, os.MFD_CLOEXEC)
            except OSError as err:  # out of file descriptors
                log.warning("no shared-memory region (%s): %d bytes go inline", err, size)
                return False
            self._regions[token] = _Region(fd, size, time.monotonic() + self.ttl_s)
        try:
            os.ftruncate(fd, size)
            for data, offset in zip(datas, offsets):
                _write_all(fd, data, offset)
        except OSError as err:  # the host is out of memory for it: the bytes stay in the reply
            self._close(token)
            log.warning("writing a %d-byte shared-memory region failed (%s): the bytes go inline", size, err)
            return False
        except BaseException:
            self._close(token)
            raise
        with self._lock:
            region = self._regions.get(token)
            if region is None:  # close() freed it meanwhile (the process is stopping): the bytes stay inline
                return False
            region.written = True
        pid = os.getpid()
        for tensor, offset in zip(tensors, offsets):
            tensor.ClearField("data")
            tensor.shm.CopyFrom(tensor_pb2.SharedMemoryHandle(host_id=self.host_id, pid=pid, fd=fd, token=token,
                                                              offset_bytes=offset))
        self._start_reaper()
        return True

    @property
    def live_bytes(self) -> int:
        return sum(r.size for r in self._regions.values())

    @property
    def num_regions(self) -> int:
        with self._lock:
            return len(self._regions)

    def close(self) -> None:
        """Frees every region (the process is stopping)."""
        self._closed.set()
        with self._lock:
            for token in list(self._regions):
                self._close_locked(token)

    def reap(self) -> None:
        """Closes claimed (emptied) and expired regions; the reaper thread calls this twice a TTL or more."""
        with self._lock:
            self._reap_locked()

    def _reap_locked(self) -> None:
        now = time.monotonic()
        for token, region in list(self._regions.items()):
            if not region.written:  # its export is still writing it: neither claimed nor expired
                continue
            try:
                claimed = os.fstat(region.fd).st_size == 0
            except OSError:
                claimed = True
            if claimed or now >= region.expires_at:
                if not claimed:
                    log.info("shared-memory region %s (%d bytes) unclaimed after %.0f s: freed", token,
                             region.size, self.ttl_s)
                self._close_locked(token)

    def _close(self, token: str) -> None:
        with self._lock:
            self._close_locked(token)

    def _close_locked(self, token: str) -> None:
        region = self._regions.pop(token, None)
        if region is not None:
            os.close(region.fd)

    def _start_reaper(self) -> None:
        with self._lock:
            if self._reaper is not None:
                return
            self._reaper = threading.Thread(target=self._reap_loop, name="shm-reaper", daemon=True)
        self._reaper.start()

    def _reap_loop(self) -> None:
        interval_s = min(max(self.ttl_s / 4, 0.05), 1.0)
        while not self._closed.wait(interval_s):
            self.reap()


class Reader:
    """The reader's side (the LLM), for one request: `payload` copies tensors out of regions (each region
    opened once), `close` claims every region it opened. An ExternalBytes source for "shm"."""

    def __init__(self):
        self.host_id = host_id()
        self._open: dict[str, int] = {}  # token -> our fd

    def payload(self, proto: tensor_pb2.Tensor, nbytes: int, name: str) -> bytearray:
        handle = proto.shm
        fd = self._region(handle, name)
        size = os.fstat(fd).st_size
        if size == 0:
            raise _unavailable(name, handle, "gone", "another reader has taken it")
        if handle.offset_bytes + nbytes > size:
            raise InvalidArgument(f"{name}: bytes [{handle.offset_bytes}, {handle.offset_bytes + nbytes}) run past "
                                  f"the end of its {size}-byte shared-memory region", reason="SHM_HANDLE_INVALID",
                                  metadata={"input": name})
        buffer = bytearray(nbytes)
        if _read_all(fd, memoryview(buffer), handle.offset_bytes) != nbytes:  # truncated while we read
            raise _unavailable(name, handle, "gone", "another reader took it while this one read")
        return buffer

    def close(self) -> None:
        """Claims (empties, which frees) every region this request read, then closes them."""
        for fd in self._open.values():
            try:
                os.ftruncate(fd, 0)
            except OSError as err:  # the owner's memory is freed by its TTL then
                log.warning("claiming a shared-memory region failed: %s", err)
            os.close(fd)
        self._open.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _region(self, handle: tensor_pb2.SharedMemoryHandle, name: str) -> int:
        fd = self._open.get(handle.token)
        if fd is not None:
            return fd
        if not _TOKEN.fullmatch(handle.token) or handle.pid <= 0 or handle.fd < 0 or handle.offset_bytes < 0:
            raise InvalidArgument(f"{name}: malformed shared-memory handle (token {handle.token!r}, pid {handle.pid}, "
                                  f"fd {handle.fd}, offset {handle.offset_bytes})", reason="SHM_HANDLE_INVALID",
                                  metadata={"input": name})
        if not AVAILABLE:
            raise _unavailable(name, handle, "otherHost", "this host has no memfd shared memory")
        if handle.host_id != self.host_id:
            raise _unavailable(name, handle, "otherHost", f"the region is on host {handle.host_id or '(unknown)'}, "
                               f"this process on {self.host_id}")
        # Only our regions are opened: whatever else the caller's pid/fd name (a device, a pipe) is never
        # touched. The name is checked before opening, and again on what was opened (the fd may change between).
        expected = f"/memfd:{PREFIX}{handle.token} (deleted)"
        path = f"/proc/{handle.pid}/fd/{handle.fd}"
        try:
            if os.readlink(path) != expected:
                raise FileNotFoundError(path)  # the fd number now holds another file: ours was freed
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
        except FileNotFoundError:
            raise _unavailable(name, handle, "gone", f"process {handle.pid} has exited or freed it (its time to "
                               "live passed, or it restarted)") from None
        except PermissionError:
            raise _unavailable(name, handle, "denied", f"this process may not open process {handle.pid}'s memory "
                               "(another user, or another PID namespace)") from None
        except OSError as err:
            raise _unavailable(name, handle, "gone", f"opening it failed: {err.strerror}") from None
        if os.readlink(f"/proc/self/fd/{fd}") != expected:
            os.close(fd)
            raise _unavailable(name, handle, "gone", f"process {handle.pid} has freed it meanwhile")
        self._open[handle.token] = fd
        return fd


def _unavailable(name: str, handle: tensor_pb2.SharedMemoryHandle, cause: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{name}: cannot read shared-memory region {handle.token}: {why}. Encode again with inline embeddings, "
        "or run the encoder and the LLM on one host, as one user, in one PID namespace",
        reason="SHM_REGION_UNAVAILABLE", metadata={"cause": cause, "pid": str(handle.pid)})


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view[:_MAX_IO], offset)
        view, offset = view[written:], offset + written


def _read_all(fd: int, buffer: memoryview, offset: int) -> int:
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:done + _MAX_IO]], offset + done)
        if n == 0:
            break
        done += n
    return done
