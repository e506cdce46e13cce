"""services/processor/ring.py: consistent hashing with bounded loads, on its own."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from services.processor.ring import LOAD_FACTOR, HashRing

A, B, C = "10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"
KEYS = [f"{i:016x}" for i in range(2000)]


def _owners(ring: HashRing, addresses: list[str]) -> dict[str, str]:
    """Each key's replica when nothing is in flight (the bound does not bite)."""
    return {key: ring.pick(key, dict.fromkeys(addresses, 0)) for key in KEYS}


def test_the_same_replicas_make_the_same_ring_and_split_the_keys_evenly():
    owners = _owners(HashRing([A, B, C]), [A, B, C])
    assert owners == _owners(HashRing([C, A, B]), [A, B, C])  # order of the addresses does not matter
    shares = Counter(owners.values())
    assert all(abs(shares[r] / len(KEYS) - 1 / 3) < 0.06 for r in (A, B, C)), shares


def test_a_replica_leaving_moves_only_its_own_keys():
    ring = HashRing([A, B, C])
    before = _owners(ring, [A, B, C])
    after = _owners(ring, [A, B])  # C unhealthy: still on the ring, not a candidate
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == C}
    assert after == _owners(HashRing([A, B]), [A, B])  # the same as a ring built without C
    assert _owners(ring, [A, B, C]) == before  # C back: its keys come back to it


def test_a_hot_key_fills_its_replica_to_the_bound_then_spills_in_ring_order():
    ring = HashRing([A, B, C])
    key = KEYS[0]
    order = list(ring.walk(key))
    assert sorted(order) == sorted([A, B, C])
    loads = dict.fromkeys([A, B, C], 0)
    for placed in range(1, 61):
        chosen = ring.pick(key, loads)
        loads[chosen] += 1
        capacity = math.ceil(LOAD_FACTOR * placed / 3)
        assert max(loads.values()) <= capacity, (placed, loads)
    assert loads[order[0]] >= loads[order[1]] >= loads[order[2]] > 0  # preference order kept as far as allowed
    assert loads[order[0]] == math.ceil(LOAD_FACTOR * 60 / 3)


def test_the_preferred_replica_wins_within_the_bound_only():
    ring = HashRing([A, B])
    key = KEYS[1]
    owner, other = ring.walk(key)
    assert ring.pick(key, {A: 0, B: 0}, prefer=other) == other
    assert ring.pick(key, {owner: 0, other: 5}, prefer=other) == owner  # the holder is over the bound
    assert ring.pick(key, {owner: 0}, prefer=other) == owner  # the holder is not a candidate


def test_no_candidate_is_an_error():
    with pytest.raises(ValueError):
        HashRing([A]).pick(KEYS[0], {})
    assert list(HashRing([]).walk(KEYS[0])) == []
