"""Shared-memory embeddings between two processes: exact bytes, read once, nothing left behind.

The owner (as the encoder) is a separate process; this test process reads (as the LLM does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.common import shm
from services.common.api.triptych.common.v1 import tensor_pb2
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.tensors import from_proto, slice_rows, to_proto

pytestmark = pytest.mark.skipif(not shm.AVAILABLE, reason="needs Linux memfd and /proc")

ROOT = Path(__file__).resolve().parents[2]
# The owner: exports tensors of the given row counts into one region, prints them, then obeys commands.
OWNER = """
import sys, torch
from services.common import shm
from services.common.tensors import to_proto
ttl_s, max_bytes, *rows = (float(a) for a in sys.argv[1:])
exporter = shm.Exporter(ttl_s=ttl_s, max_bytes=int(max_bytes))
protos = [to_proto(torch.randn(int(n), 64, generator=torch.Generator().manual_seed(i))) for i, n in enumerate(rows)]
print(exporter.export(protos), flush=True)
for proto in protos:
    print(proto.SerializeToString().hex(), flush=True)
for line in sys.stdin:
    if line.strip() == "count":
        exporter.reap()
        print(exporter.num_regions, flush=True)
"""


class Owner:
    def __init__(self, *rows: int, ttl_s: float = 60, max_bytes: int = 1 << 30):
        self.popen = subprocess.Popen([sys.executable, "-c", OWNER, str(ttl_s), str(max_bytes), *map(str, rows)],
                                      cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.exported = self.popen.stdout.readline().strip() == "True"
        self.tensors = [tensor_pb2.Tensor.FromString(bytes.fromhex(self.popen.stdout.readline()))
                        for _ in rows]

    def regions(self) -> int:
        """Regions the owner still holds, after closing the claimed and expired ones."""
        self.popen.stdin.write("count\n")
        self.popen.stdin.flush()
        return int(self.popen.stdout.readline())

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def owners():
    started: list[Owner] = []

    def start(*rows: int, **kwargs) -> Owner:
        started.append(Owner(*rows, **kwargs))
        return started[-1]

    yield start
    for owner in started:
        owner.close()


def _expected(i: int, rows: int) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(i))


def _holders(token: str) -> list[str]:
    """Every fd on this host (that we may see) that holds the region: the kernel frees it when none does."""
    name = f"/memfd:{shm.PREFIX}{token} (deleted)"
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for link in fd_dir.iterdir():
                if os.readlink(link) == name:
                    found.append(str(link))
        except OSError:  # a process that exited meanwhile, or one we may not look into
            continue
    return found


def _read(*protos: tensor_pb2.Tensor) -> list[torch.Tensor]:
    with shm.Reader() as reader:
        return [from_proto(p, "t", external={"shm": reader}) for p in protos]


def _unavailable(proto: tensor_pb2.Tensor) -> FailedPrecondition:
    with pytest.raises(FailedPrecondition) as caught:
        _read(proto)
    assert caught.value.reason == "SHM_REGION_UNAVAILABLE"
    return caught.value


def test_another_process_reads_the_exact_tensors_once_and_frees_the_region(owners):
    owner = owners(300, 5)
    assert owner.exported
    a, b = owner.tensors
    assert a.WhichOneof("external_data") == "shm" and not a.data
    assert a.shm.token == b.shm.token and b.shm.offset_bytes % 64 == 0  # one region per reply
    token = a.shm.token
    assert _holders(token) == [f"/proc/{owner.popen.pid}/fd/{a.shm.fd}"]

    got = _read(a, b)
    assert torch.equal(got[0], _expected(0, 300)) and torch.equal(got[1], _expected(1, 5))
    assert owner.regions() == 0  # the read claimed it: the owner closed its fd
    assert _holders(token) == []
    assert _unavailable(a).metadata["cause"] == "gone"  # once only


def test_row_slices_of_one_region_in_one_request(owners):
    owner = owners(40)
    proto = owner.tensors[0]
    first, rest = _read(slice_rows(proto, slice(0, 10)), slice_rows(proto, slice(10, 40)))
    assert torch.equal(torch.cat([first, rest]), _expected(0, 40))


def test_unclaimed_regions_are_freed_after_the_ttl(owners):
    owner = owners(100, ttl_s=0.5)
    token = owner.tensors[0].shm.token
    assert len(_holders(token)) == 1
    deadline = time.monotonic() + 10
    while _holders(token) and time.monotonic() < deadline:  # the owner's reaper thread, not a request
        time.sleep(0.1)
    assert _holders(token) == []
    assert owner.regions() == 0
    assert _unavailable(owner.tensors[0]).metadata["cause"] == "gone"


def test_a_killed_owner_leaves_nothing(owners):
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    owner = owners(2000)
    proto = owner.tensors[0]
    assert len(_holders(proto.shm.token)) == 1
    owner.kill()
    assert _holders(proto.shm.token) == []  # no fd anywhere: the kernel has freed the memory
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    assert not {name for name in after - before if "triptych" in name}
    err = _unavailable(proto)
    assert err.metadata == {"cause": "gone", "pid": str(proto.shm.pid)}


def test_a_handle_from_another_host_is_refused_with_its_cause(owners):
    proto = owners(10).tensors[0]
    proto.shm.host_id = "00000000-0000-0000-0000-000000000000"
    err = _unavailable(proto)
    assert err.metadata["cause"] == "otherHost"
    assert "is on host 00000000" in err.message


def test_a_reused_fd_number_is_not_mistaken_for_the_region(owners):
    owner = owners(10)
    proto = owner.tensors[0]
    fd = os.memfd_create(shm.PREFIX + "f" * 32)  # what the handle's pid/fd now hold: another region
    try:
        os.ftruncate(fd, 4096)
        proto.shm.pid, proto.shm.fd = os.getpid(), fd
        assert _unavailable(proto).metadata["cause"] == "gone"
        assert os.fstat(fd).st_size == 4096  # not read, not claimed
    finally:
        os.close(fd)


@pytest.mark.parametrize("field, value", [("token", "../../etc"), ("pid", 0), ("fd", -1), ("offset_bytes", -8)])
def test_malformed_handles_are_invalid(owners, field, value):
    proto = owners(10).tensors[0]
    setattr(proto.shm, field, value)
    with pytest.raises(InvalidArgument) as caught:
        _read(proto)
    assert caught.value.reason == "SHM_HANDLE_INVALID"


def test_bytes_past_the_region_are_invalid(owners):
    proto = owners(10).tensors[0]
    proto.shape[:] = [1000, 64]
    with pytest.raises(InvalidArgument) as caught:
        _read(proto)
    assert caught.value.reason == "SHM_HANDLE_INVALID"


def test_over_budget_or_off_the_tensors_stay_inline(owners):
    owner = owners(100, max_bytes=1000)
    assert not owner.exported
    assert owner.tensors[0].WhichOneof("external_data") is None
    assert torch.equal(from_proto(owner.tensors[0]), _expected(0, 100))
    protos = [to_proto(torch.zeros(3, 4))]
    assert not shm.Exporter(ttl_s=1, max_bytes=0).export(protos)
    assert protos[0].WhichOneof("external_data") is None


def test_shared_memory_where_only_inline_is_taken_is_refused(owners):
    proto = owners(10).tensors[0]
    with pytest.raises(InvalidArgument) as caught:
        from_proto(proto, "x")
    assert caught.value.reason == "TENSOR_LOCATION_UNSUPPORTED"


def test_a_region_still_being_written_is_not_reaped_as_claimed(monkeypatch):
    """Two exports at once (the encoder's two reply threads): a region is registered empty, then sized and
    written outside the lock. The other export's reap ran in between and took the empty region for a claimed
    one: it closed its fd, its own memfd took that fd number, and the first export wrote its bytes into the
    second's region (issue 18: an admitted request answered from another request's image). Forced here: the
    second export runs whole between the first's registering and sizing its region."""
    exporter = shm.Exporter(ttl_s=60, max_bytes=1 << 20)
    first, second = [to_proto(_expected(0, 8))], [to_proto(_expected(1, 8))]
    ftruncate = os.ftruncate

    def another_export_first(fd: int, size: int) -> None:
        monkeypatch.setattr(os, "ftruncate", ftruncate)  # once
        assert exporter.export(second)
        ftruncate(fd, size)

    monkeypatch.setattr(os, "ftruncate", another_export_first)
    try:
        assert exporter.export(first)
        assert torch.equal(_read(*second)[0], _expected(1, 8))  # its own bytes, not the first's
        assert torch.equal(_read(*first)[0], _expected(0, 8))
    finally:
        exporter.close()
