"""Domain exceptions and the one place they become gRPC statuses.

Service code raises `InvalidArgument(...)` etc.; `ErrorInterceptor` (server.py)
turns them into a status with a `google.rpc.ErrorInfo` detail. Calls to other
services go through `from_rpc_error`, so a downstream failure reaches the
caller with the right code and the name of the service that failed.

Every `reason` is the name of a value of `triptych.common.v1.ErrorReason`
(protos/triptych/common/v1/error_reason.proto), where clients read when each
happens and what to do; tests/common/test_error_reasons.py keeps the two equal.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.api.triptych.common.v1 import error_reason_pb2

# Every reason a Triptych service reports (the contract's ErrorReason values).
REASONS: frozenset[str] = frozenset(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}

# A downstream status without ErrorInfo comes from gRPC itself (or a server that is not ours):
# its reason names the service and one of these, e.g. ENCODER_UNAVAILABLE.
_TRANSPORT_REASONS = {
    grpc.StatusCode.UNAVAILABLE: "UNAVAILABLE",
    grpc.StatusCode.CANCELLED: "UNAVAILABLE",  # the connection went away mid-call
    grpc.StatusCode.DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",  # a message over the size limit
}


class TriptychError(Exception):
    """A failure with a gRPC status code, a stable reason and a message a user can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, reason: str, domain: str | None = None, metadata: dict[str, str] | None = None,
                 retry_delay_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason  # stable UPPER_SNAKE constant, e.g. "IMAGE_DECODE_FAILED"
        self.domain = domain  # None: the domain of the service that reports it, e.g. "triptych.llm"
        self.metadata = metadata or {}
        # Set on refusals worth retrying (a full queue, a restarting engine): sent as google.rpc.RetryInfo
        # and as ErrorInfo metadata retryDelayMs.
        self.retry_delay_s = retry_delay_s
        if retry_delay_s is not None:
            self.metadata.setdefault("retryDelayMs", str(round(retry_delay_s * 1000)))

    def to_status(self, default_domain: str = "triptych") -> grpc.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain or default_domain,
                                           metadata=self.metadata)
        details = [any_pb2.Any()]
        details[0].Pack(info)
        if self.retry_delay_s is not None:
            delay_ns = round(self.retry_delay_s * 1e9)
            retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
                seconds=delay_ns // 10**9, nanos=delay_ns % 10**9))
            details.append(any_pb2.Any())
            details[1].Pack(retry)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=details)
        return rpc_status.to_status(status)


class InvalidArgument(TriptychError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TriptychError):
    code = grpc.StatusCode.NOT_FOUND


class PermissionDenied(TriptychError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(TriptychError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(TriptychError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(TriptychError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(TriptychError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(TriptychError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(TriptychError):
    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[TriptychError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, PermissionDenied, FailedPrecondition, ResourceExhausted,
                Unavailable, DeadlineExceeded, Internal)
}


def error_info(call: grpc.aio.AioRpcError | grpc.Call) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if it has one (clients and tests use this)."""
    status = rpc_status.from_call(call)
    for detail in status.details if status else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    return None


def retry_delay_s(call: grpc.aio.AioRpcError | grpc.Call) -> float | None:
    """The google.rpc.RetryInfo delay of a failed call, in seconds, if it has one."""
    status = rpc_status.from_call(call)
    for detail in status.details if status else ():
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return None


def from_rpc_error(err: grpc.aio.AioRpcError, service: str, address: str) -> TriptychError:
    """Converts a failed call to another Triptych service into a domain error for our caller.

    A down service is UNAVAILABLE, a slow one DEADLINE_EXCEEDED; a rejection keeps its code
    and reason, so a bad embedding is still INVALID_ARGUMENT when it reaches the client.
    """
    code = err.code()
    info = error_info(err)
    cls = _BY_CODE.get(code, Internal)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        cls = Unavailable
        message = f"{service} at {address} is unavailable: {err.details()}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        message = f"deadline exceeded waiting for {service} at {address}"
    else:
        message = f"{service}: {err.details()}"
    return cls(
        message,
        reason=info.reason if info else downstream_reason(service, code),
        domain=info.domain if info else f"triptych.{service}",
        metadata=dict(info.metadata) if info else {},
        # A downstream's retry hint (the LLM's full queue, an overloaded encoder) reaches our caller as
        # RetryInfo too: without it the processor's client saw RESOURCE_EXHAUSTED with no delay to wait.
        retry_delay_s=retry_delay_s(err),
    )


def downstream_reason(service: str, code: grpc.StatusCode) -> str:
    """The reason of a failed call to `service` ("encoder", "llm") whose status has no ErrorInfo."""
    return f"{service.upper()}_{_TRANSPORT_REASONS.get(code, 'CALL_FAILED')}"


__all__ = [
    "TriptychError", "InvalidArgument", "NotFound", "PermissionDenied", "FailedPrecondition",
    "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Internal", "error_info", "retry_delay_s",
    "from_rpc_error", "downstream_reason", "REASONS",
]
