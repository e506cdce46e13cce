"""The contract's sampling ranges, whatever the model: checked by the processor before any media
work and by the LLM again (its callers may be routers). INVALID_ARGUMENT names the field."""

from __future__ import annotations

import math

from services.common.api.triptych.common.v1 import generation_pb2
from services.common.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20  # as the OpenAI API and vLLM's default max_logprobs


def invalid_param(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"sampling.{field} {message}", reason="SAMPLING_PARAM_INVALID",
                           metadata={"field": f"sampling.{field}"})


def check_range(field: str, value: float, low: float, high: float) -> None:
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid_param(field, f"must be in [{low:g}, {high:g}], got {value}")


def check_params(s: generation_pb2.SamplingParams) -> None:
    """The ranges the contract gives, whatever the model; INVALID_ARGUMENT naming the first bad field.

    The processor checks them before any media work, the LLM again (its clients may be routers).
    """
    if s.max_new_tokens < 0:
        raise invalid_param("max_new_tokens", f"must be >= 0, got {s.max_new_tokens}")
    check_range("temperature", s.temperature, 0, 100)
    check_range("top_p", s.top_p, 0, 1)
    if s.top_k < 0:
        raise invalid_param("top_k", f"must be >= 0, got {s.top_k}")
    check_range("min_p", s.min_p, 0, 1)
    if s.HasField("repetition_penalty"):
        check_range("repetition_penalty", s.repetition_penalty, 0.01, 10)
    check_range("presence_penalty", s.presence_penalty, -2, 2)
    check_range("frequency_penalty", s.frequency_penalty, -2, 2)
    check_range("top_logprobs", s.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if s.top_logprobs and not s.logprobs:
        raise invalid_param("top_logprobs", "needs sampling.logprobs set")
