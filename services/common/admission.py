"""Admission control at a service's door: at most `limit` calls in flight, one more refused at once.

A server that queues without bound answers every request late under overload, and its memory grows
with the queue (decoded media, tensors). Refusing the excess before any work (no media decoded, no
tensor parsed) keeps the admitted calls' latency and memory bounded, and tells the caller at once to
retry later or elsewhere: RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, as the LLM's own queue does
(services/llm/engine_client.py). Counted on the event loop (grpc.aio runs every call's coroutine
there), so no lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from services.common.errors import ResourceExhausted

RETRY_DELAY_S = 1.0  # the hint a refused caller gets: an admitted call of a tiny to mid model ends by then


class Admission:
    """`limit` calls at once (0: no limit); `flag` names the option a user raises, `reason` the refusal."""

    def __init__(self, limit: int, *, service: str, flag: str, reason: str, retry_delay_s: float = RETRY_DELAY_S):
        if limit < 0:
            raise ValueError(f"{flag} is {limit}; it must be at least 0 (0: no limit)")
        self.limit = limit
        self.service = service
        self.flag = flag
        self.reason = reason
        self.retry_delay_s = retry_delay_s
        self.in_flight = 0
        self.refused = 0

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Holds one place for the block; ResourceExhausted at once when all are taken."""
        if self.limit and self.in_flight >= self.limit:
            self.refused += 1
            raise ResourceExhausted(
                f"the {self.service} is serving {self.in_flight} requests, its limit ({self.flag} {self.limit}); "
                f"retry in about {self.retry_delay_s:g} s with backoff, send to another replica, or raise {self.flag}",
                reason=self.reason, metadata={"maxConcurrentRequests": str(self.limit)},
                retry_delay_s=self.retry_delay_s)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
