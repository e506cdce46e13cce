"""ErrorInfo.reason: every reason the services raise is documented in the contract, and no other.

The list clients switch on is `ErrorReason` in protos/triptych/common/v1/error_reason.proto. This
test reads every `reason=` the code under services/ passes and compares: a new reason needs a new
enum value (with its comment), and a value no code raises any more is marked deprecated.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest

from services.common.api.triptych.common.v1 import error_reason_pb2
from services.common.errors import REASONS, Internal, Unavailable, downstream_reason, from_rpc_error

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ROOT / "services"
GENERATED = SERVICES / "common" / "api"
DOWNSTREAM = ("encoder", "llm")  # the services the processor calls (services/processor/router.py)

# Reasons computed at run time, by their source text (as ast.unparse writes it): the values each can take.
DYNAMIC: dict[str, set[str]] = {
    # router.py, a downstream that does not answer at start
    "f'{self.service.upper()}_UNAVAILABLE'": {f"{s.upper()}_UNAVAILABLE" for s in DOWNSTREAM},
    # errors.from_rpc_error: a downstream's own reason (checked where it is raised), or one of ours
    "info.reason if info else downstream_reason(service, code)":
        {downstream_reason(s, code) for s in DOWNSTREAM for code in grpc.StatusCode if code != grpc.StatusCode.OK},
    # errors.TriptychError.to_status: the error's own reason
    "self.reason": set(),
    # a helper's `reason` parameter (models/inputs.validate): its callers pass literals, scanned there
    "reason": set(),
}


def raised_reasons() -> dict[str, list[str]]:
    """Every reason the services can report -> where (file:line)."""
    found: dict[str, list[str]] = {}
    for path in sorted(SERVICES.rglob("*.py")):
        if GENERATED in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            for keyword in node.keywords:
                if keyword.arg != "reason":
                    continue
                where = f"{path.relative_to(ROOT)}:{keyword.value.lineno}"
                if isinstance(keyword.value, ast.Constant) and isinstance(keyword.value.value, str):
                    values = {keyword.value.value}
                else:
                    source = ast.unparse(keyword.value)
                    assert source in DYNAMIC, f"{where}: reason={source} is computed; list its values in DYNAMIC"
                    values = DYNAMIC[source]
                for value in values:
                    found.setdefault(value, []).append(where)
    return found


def deprecated_values() -> set[str]:
    enum = error_reason_pb2.DESCRIPTOR.enum_types_by_name["ErrorReason"]
    return {value.name for value in enum.values if value.GetOptions().deprecated}


def test_scan_finds_the_reasons():
    # Guards the scanner itself: a literal, one from each dynamic pattern.
    found = raised_reasons()
    assert {"PLACEHOLDER_COUNT_MISMATCH", "LLM_UNAVAILABLE", "ENCODER_CALL_FAILED"} <= found.keys()
    assert len(found) > 40


def test_every_raised_reason_is_in_the_contract():
    unknown = {reason: where for reason, where in raised_reasons().items() if reason not in REASONS}
    assert not unknown, (f"reasons missing from enum ErrorReason (protos/triptych/common/v1/error_reason.proto; "
                         f"add each with a comment, then run scripts/gen_protos.py): {unknown}")


def test_every_contract_reason_is_raised():
    unused = REASONS - raised_reasons().keys() - deprecated_values()
    assert not unused, (f"ErrorReason values no service reports: {sorted(unused)}; a value is never removed, "
                        "mark it [deprecated = true]")


def test_reason_names_are_upper_snake():
    assert all(name.replace("_", "").isalnum() and name.isupper() for name in REASONS)


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="connection reset")


@pytest.mark.parametrize(("code", "cls", "reason"), [
    (grpc.StatusCode.UNAVAILABLE, Unavailable, "ENCODER_UNAVAILABLE"),
    (grpc.StatusCode.CANCELLED, Unavailable, "ENCODER_UNAVAILABLE"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, None, "ENCODER_DEADLINE_EXCEEDED"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, None, "ENCODER_RESOURCE_EXHAUSTED"),
    (grpc.StatusCode.UNIMPLEMENTED, Internal, "ENCODER_CALL_FAILED"),
])
def test_downstream_status_without_error_info(code, cls, reason):
    # What gRPC itself reports (no ErrorInfo) still reaches the client with a documented reason.
    err = from_rpc_error(_rpc_error(code), "encoder", "127.0.0.1:1")
    assert (err.reason, err.domain) == (reason, "triptych.encoder")
    assert reason in REASONS
    if cls is not None:
        assert type(err) is cls


def test_a_downstream_retry_hint_reaches_the_caller():
    """The LLM's full queue (or an overloaded encoder) says when to retry: the processor passes the
    RetryInfo on, not only the reason (the client of the processor backs off by it)."""
    from services.common.errors import ResourceExhausted, retry_delay_s

    status = ResourceExhausted("the LLM is full", reason="LLM_QUEUE_FULL", retry_delay_s=1.5).to_status("triptych.llm")
    call = grpc.aio.AioRpcError(status.code, grpc.aio.Metadata(), grpc.aio.Metadata(*status.trailing_metadata),
                                details=status.details)
    err = from_rpc_error(call, "llm", "127.0.0.1:1")
    assert (err.reason, err.retry_delay_s, err.metadata["retryDelayMs"]) == ("LLM_QUEUE_FULL", 1.5, "1500")
    again = err.to_status()  # what the processor sends its own caller
    resent = grpc.aio.AioRpcError(again.code, grpc.aio.Metadata(), grpc.aio.Metadata(*again.trailing_metadata),
                                  details=again.details)
    assert retry_delay_s(resent) == 1.5
    assert retry_delay_s(_rpc_error(grpc.StatusCode.UNAVAILABLE)) is None
