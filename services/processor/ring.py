"""Consistent hashing with bounded loads: which encoder replica an item goes to.

Items are keyed by mm_hash, so the same image lands on the same replica (the one whose cache holds
its embedding) for as long as that replica is healthy and not overloaded. Mirrokni, Thorup and
Zadimoghaddam, "Consistent Hashing with Bounded Loads" (2018): walk clockwise from the key's point
and take the first replica whose load stays within ceil(c * average); c > 1 bounds every replica at
c times the average while a key still moves only when its replica is full or gone.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping

# Points per replica on the ring: with 100 the keys split between replicas within a few percent.
VIRTUAL_NODES = 100
# Mirrokni et al.'s c: a replica may carry up to 25 % more than the average before keys skip it.
LOAD_FACTOR = 1.25


def _point(text: str) -> int:
    """A 64-bit position on the ring (blake2b: stable across processes, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    """The replicas' virtual nodes on a 64-bit circle; the same addresses always make the same ring."""

    def __init__(self, addresses: Iterable[str], virtual_nodes: int = VIRTUAL_NODES):
        self.addresses = frozenset(addresses)
        points = sorted((_point(f"{address}#{i}"), address) for address in self.addresses
                        for i in range(virtual_nodes))
        self._positions = [p for p, _ in points]
        self._owners = [a for _, a in points]

    def walk(self, key: str) -> Iterator[str]:
        """Every replica once, clockwise from the key's point: the key's preference order."""
        if not self._owners:
            return
        start = bisect.bisect_left(self._positions, _point(key))
        seen: set[str] = set()
        for step in range(len(self._owners)):
            owner = self._owners[(start + step) % len(self._owners)]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.addresses):
                    return

    def pick(self, key: str, loads: Mapping[str, int], prefer: str | None = None,
             load_factor: float = LOAD_FACTOR) -> str:
        """The first replica within ceil(load_factor * average load), this item included: `prefer` (the
        replica known to hold the key's embedding), then the key's order on the ring. `loads` holds
        the candidates and their items in flight."""
        if not loads:
            raise ValueError("no candidate replicas")
        capacity = math.ceil(load_factor * (sum(loads.values()) + 1) / len(loads))
        for address in itertools.chain([prefer] if prefer in loads else [], self.walk(key)):
            if address in loads and loads[address] + 1 <= capacity:
                return address
        # Unreachable while every candidate is on the ring: the least loaded is at or below the average.
        raise ValueError(f"no replica of {sorted(loads)} on the ring has room")
