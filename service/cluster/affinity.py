"""Adapter identity across replicas, and rendezvous (highest-random-weight) placement. No Ray here.

A request is routed by the *content* of its adapter, `name@sha256`, never by the name alone: an
overwrite makes a new key, so it gets its own placement and no replica can answer from the old weights.

Placement: every (key, replica) pair gets a pseudo-random weight; the replica with the highest weight is
the key's home, the next one its second choice. Removing a replica moves only the keys it was home to
(each to its own second choice), and adding one takes over ~1/N of the keys: the rest of the cache stays
warm.

A home is *busy* when it has at least `spill_at` requests in flight and more than (1 + slack) times the
mean of all replicas (bounded-load consistent hashing, Mirrokni et al. 2018). A busy home shares the key
with its second choice (the shorter queue wins) when the second already holds the key, or when the home's
queue is at least twice the second's plus `spill_at`: a hot adapter reaches the second replica once and is
then served by both, instead of queueing behind one, while a cold adapter does not cost a second replica
a load (and an eviction) just because its home is momentarily busier. Under even load every adapter
stays on its home. (Both conditions were measured: with an absolute threshold alone every queue passes
it under steady load and placement decays into random spreading; without the residency check, the 12%
of requests that spilled cost 20% more cold loads.)

A replica whose recent requests are mostly (half or more) one adapter homed on it is *devoted* to it: the
other adapters homed there go to their second choice (unless that one is far busier), so its share climbs
and its merge policy merges the adapter (zero overhead); the hot adapter itself spreads to its second
choice only once its home's queue is twice the second's plus `spill_at`. Ray's default router neither
keeps a merged replica to its adapter nor spreads a hot one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Iterable, Mapping

__all__ = ["BASE", "CONTROL_PREFIX", "adapter_key", "parse_key", "short_key", "control_id", "control_target",
           "rendezvous_order", "placement"]

BASE = "base"
CONTROL_PREFIX = "@replica:"  # a multiplexed id that addresses one replica (admin fan-out), never an adapter


def adapter_key(name: str, sha256: str) -> str:
    return f"{name}@{sha256}"


def parse_key(key: str) -> tuple[str, str | None]:
    """`name@sha256` -> (name, sha256); `base` -> ("base", None)."""
    name, _, sha = key.rpartition("@")
    return (name, sha) if name else (key, None)


def short_key(key: str) -> str:
    """For people: `support@5442a1b2c3d4` (12 hex digits identify a version well enough to read)."""
    name, sha = parse_key(key)
    return name if sha is None else f"{name}@{sha[:12]}"


def control_id(replica_id: str) -> str:
    return CONTROL_PREFIX + replica_id


def control_target(multiplexed_model_id: str | None) -> str | None:
    if multiplexed_model_id and multiplexed_model_id.startswith(CONTROL_PREFIX):
        return multiplexed_model_id[len(CONTROL_PREFIX):]
    return None


def _weight(key: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids, the key's home first: every router computes the same order without talking to another."""
    return sorted(replica_ids, key=lambda r: _weight(key, r), reverse=True)


def placement(key: str, replica_ids: Iterable[str], loads: Mapping[str, int], spill_at: int,
              slack: float = 0.25, resident: Mapping[str, Container[str]] | None = None,
              dominant: Mapping[str, str | None] | None = None) -> list[list[str]]:
    """Ranks of candidate replicas for `key`, most preferred first (Ray picks the shortest queue within a
    rank that is not full, and tries the next rank only when the whole rank is full):

        home keeps it:          [[home], [second], [everyone else]]
        home shares:            [[home, second], [everyone else]]
        home devoted to another [[second], [home], [everyone else]]

    `resident`: replica id -> the keys it holds (as Ray's multiplexing reports them; may lag a little).
    `dominant`: replica id -> the key with most of its recent requests (at least half), if any.
    """
    order = rendezvous_order(key, replica_ids)
    if len(order) <= 1:
        return [order] if order else []
    home, second, rest = order[0], order[1], order[2:]
    tail = [rest] if rest else []
    at_home, at_second = loads.get(home, 0), loads.get(second, 0)
    far_busier = at_home >= 2 * at_second + spill_at
    devoted_to = (dominant or {}).get(home)
    if devoted_to is not None and rendezvous_order(devoted_to, order)[0] != home:
        devoted_to = None  # a replica serving another's hot adapter as its second choice is not devoted to it
    if devoted_to is not None:
        if devoted_to != key and not at_second >= 2 * at_home + spill_at:
            return [[second], [home]] + tail  # leave the home to its hot adapter, so that it can merge it
        if devoted_to == key:
            return ([[home, second]] if far_busier else [[home], [second]]) + tail
    mean = sum(loads.get(r, 0) for r in order) / len(order)
    busy = at_home >= spill_at and at_home > (1 + slack) * mean
    cheap = key in (resident or {}).get(second, ()) or far_busier
    return ([[home, second]] if busy and cheap else [[home], [second]]) + tail
