"""Failures as OpenAI's API reports them: {"error": {"message", "type", "param", "code"}} and an HTTP status.

`code` is the ErrorInfo reason (the front's own, or the processor's as it sent it), so a client
switches on the same strings as a gRPC client. The HTTP status follows the gRPC code, as
google.rpc's mapping has it (INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED 429,
UNAVAILABLE 503, DEADLINE_EXCEEDED 504, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc
from fastapi.responses import JSONResponse

from services.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    TriptychError,
    Unavailable,
    error_info,
)
from services.front.schema import ErrorBody, ErrorResponse

DOMAIN = "triptych.front"

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}
# OpenAI's error `type` per HTTP status (informational: clients switch on the status and `code`).
_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}
# The processor names a bad part "messages[0].content[1].image: ..." and a bad sampling field in
# metadata "field": the request's names for them.
_PART = re.compile(r"messages\[\d+\](?:\.content\[\d+\])?")
_PARAM_NAMES = {"max_new_tokens": "max_completion_tokens"}


@dataclass
class ApiError(Exception):
    """One failure, ready to send."""

    status: int
    message: str
    code: str | None  # an ErrorReason name; None only for the framework's own 404/405
    param: str | None = None
    retry_after_s: float | None = None

    def response(self) -> JSONResponse:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        body = ErrorResponse(error=ErrorBody(message=self.message, type=kind, param=self.param, code=self.code))
        headers = {"Retry-After": str(max(1, round(self.retry_after_s)))} if self.retry_after_s is not None else None
        return JSONResponse(body.model_dump(), status_code=self.status, headers=headers)


def invalid_request(message: str, param: str | None) -> TriptychError:
    return InvalidArgument(message, reason="REQUEST_INVALID", domain=DOMAIN, metadata={"param": param or ""})


def from_domain(err: TriptychError) -> ApiError:
    """One of the front's own errors (or a processor failure made into one)."""
    delay = err.metadata.get("retryDelayMs")
    return ApiError(HTTP_STATUS.get(err.code, 500), err.message, err.reason, err.metadata.get("param") or None,
                    int(delay) / 1000 if delay else err.retry_delay_s)


def from_rpc(err: grpc.aio.AioRpcError, address: str) -> ApiError:
    """A failed processor call: its status and ErrorInfo as they came, or, without ErrorInfo (gRPC's own
    failure, another server), one of the front's PROCESSOR_* reasons."""
    info = error_info(err)
    if info is None:
        failure = from_domain(_transport_failure(err, address))
        if err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # gRPC's own: a message over the size limit
            failure.status = 413
        return failure
    metadata = dict(info.metadata)
    param = metadata.get("field", "").removeprefix("sampling.") or None
    if param is None:
        part = _PART.search(err.details() or "")
        param = part.group(0) if part else None
    delay = metadata.get("retryDelayMs")
    return ApiError(HTTP_STATUS.get(err.code(), 500), err.details() or err.code().name, info.reason,
                    _PARAM_NAMES.get(param, param), int(delay) / 1000 if delay else None)


def _transport_failure(err: grpc.aio.AioRpcError, address: str) -> TriptychError:
    code, details = err.code(), err.details()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return Unavailable(f"the processor at {address} is unavailable: {details}", reason="PROCESSOR_UNAVAILABLE",
                           domain=DOMAIN, retry_delay_s=1.0)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for the processor at {address}",
                                reason="PROCESSOR_DEADLINE_EXCEEDED", domain=DOMAIN)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhausted(f"the processor call failed: {details}", reason="PROCESSOR_CALL_FAILED",
                                 domain=DOMAIN)
    failure = Internal(f"the processor call failed: {code.name}: {details}", reason="PROCESSOR_CALL_FAILED",
                       domain=DOMAIN)
    failure.code = code if code in HTTP_STATUS else grpc.StatusCode.INTERNAL  # keep the processor's code
    return failure
