"""Adapter identity across replicas, and rendezvous (highest-random-weight) placement. No Ray here.

A request is routed by the *content* of its adapter, `name@sha256`, never by the name alone: an
overwrite makes a new key, so it gets its own placement and no replica can answer from the old weights.

Placement: every (key, replica) pair gets a pseudo-random weight; the replica with the highest weight is
the key's home, the next one its second choice. Removing a replica moves only the keys it was home to
(each to its own second choice), and adding one takes over ~1/N of the keys: the rest of the cache stays
warm.

Each key stays on its home, so each replica's device cache holds only the adapters homed there (about
1/N of them): fewer cold loads than any placement that ignores the adapter. Three rules move requests:

- *More than one replica's worth.* A key with more than 1/N of the recent adapter requests is served by
  its first ceil(share x N) choices together (the shortest queue wins): a hot adapter never queues behind
  one replica, and it costs only those replicas a slot.
- *Far busier.* A home whose queue is at least twice its second choice's plus `spill_at` shares the key
  with the second: a burst does not wait behind a long queue. Nothing milder moves a key: measured, a
  "busy" rule relative to the mean (bounded-load hashing) moved a fifth of the requests under steady
  load on two replicas and cost most of affinity's saving in cold loads.
- *Devoted.* A replica whose recent requests are mostly (half or more) one adapter homed on it is devoted
  to it: the other adapters homed there go to their second choice (unless that one is far busier), so its
  share climbs and its merge policy merges the adapter (zero overhead).

Ray's default router neither keeps a merged replica to its adapter nor spreads a hot one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

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
              share: float = 0.0, dominant: Mapping[str, str | None] | None = None) -> list[list[str]]:
    """Ranks of candidate replicas for `key`, most preferred first (Ray picks the shortest queue within a
    rank that is not full, and tries the next rank only when the whole rank is full):

        home keeps it:           [[home], [second], [everyone else]]
        more than one replica's  [[home, second, ...k], [everyone else]]   k = ceil(share x replicas)
          worth of traffic
        home far busier:         [[home, second], [everyone else]]
        home devoted to another  [[second], [home], [everyone else]]

    `share`: the key's fraction of the adapter requests routed lately (all replicas).
    `dominant`: replica id -> the key with most of its recent requests (at least half), if any.
    """
    order = rendezvous_order(key, replica_ids)
    if len(order) <= 1:
        return [order] if order else []
    home, second = order[0], order[1]
    at_home, at_second = loads.get(home, 0), loads.get(second, 0)
    far_busier = at_home >= 2 * at_second + spill_at
    needs = min(len(order), math.ceil(share * len(order) - 1e-9))
    if needs >= 2:  # more traffic than one replica's fair share: its first `needs` choices serve it together
        return [order[:needs]] + ([order[needs:]] if order[needs:] else [])
    devoted_to = (dominant or {}).get(home)
    if devoted_to is not None and rendezvous_order(devoted_to, order)[0] != home:
        devoted_to = None  # a replica serving another's hot adapter as its second choice is not devoted to it
    tail = [order[2:]] if order[2:] else []
    if devoted_to is not None and devoted_to != key and not at_second >= 2 * at_home + spill_at:
        return [[second], [home]] + tail  # leave the home to its hot adapter, so that it can merge it
    return ([[home, second]] if far_busier else [[home], [second]]) + tail
