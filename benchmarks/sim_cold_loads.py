"""Cold loads per 1,000 requests that placement and the device cache's eviction order allow, simulated (no
model, no Ray): the bound the cluster benchmark (bench_cluster.py) is read against.

Requests name one of N adapters drawn from a Zipf distribution (s = 1.1), one at a time; two replicas each hold
`slots` adapters. Placement: `blind` sends each request to a random replica (routing that ignores the
adapter); `affinity` to the adapter's rendezvous home (service/cluster/affinity.py, the same hash). Eviction:
the engine's own code (service/engine/eviction.py), `lru` or `frequency`; `ideal` keeps the most likely
adapters of each replica's share resident (what a cache that knew the distribution would do). A request for an
adapter that is not resident is one cold load. Usage: python benchmarks/sim_cold_loads.py [--slots 16,24,32]
"""

from __future__ import annotations

import argparse
import random
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.cluster.affinity import adapter_key, rendezvous_order  # noqa: E402
from service.engine.eviction import UseCounts, eviction_order  # noqa: E402

REPLICAS = ["replica-a", "replica-b"]


class Cache:
    """One replica's device tier, as tiers.py trims it: the requested adapter is made resident, then the
    first in eviction order (never the one just requested) leaves until `slots` remain."""

    def __init__(self, slots: int, policy: str) -> None:
        self.slots, self.policy = slots, policy
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.uses = UseCounts(period=32 * slots)

    def request(self, key: str) -> int:
        self.uses.add({key: 1})
        if key in self.resident:
            self.resident.move_to_end(key)
            return 0
        self.resident[key] = None
        for victim in eviction_order(self.resident, self.policy, self.uses):
            if len(self.resident) <= self.slots:
                break
            if victim != key:
                del self.resident[victim]
        return 1


def simulate(n: int, s: float, slots: int, placement: str, policy: str, requests: int, seed: int) -> float:
    rng = random.Random(seed)
    keys = [adapter_key(f"task-{i:03d}", f"{i:064x}") for i in range(n)]
    weights = [1 / (k + 1) ** s for k in range(n)]
    home = {k: rendezvous_order(k, REPLICAS)[0] for k in keys}
    if policy == "ideal":  # each replica's `slots` most likely adapters, always resident
        kept: set[str] = set()
        for replica in REPLICAS:
            share = [k for k in keys if placement == "blind" or home[k] == replica]  # keys are in rank order
            kept |= {(replica, k) for k in share[:slots]}
    caches = {r: Cache(slots, policy) for r in REPLICAS}
    warm, cold = requests // 3, 0
    for i, key in enumerate(rng.choices(keys, weights, k=requests)):
        replica = rng.choice(REPLICAS) if placement == "blind" else home[key]
        miss = ((replica, key) not in kept) if policy == "ideal" else caches[replica].request(key)
        cold += miss if i >= warm else 0
    return 1000 * cold / (requests - warm)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--slots", default="16,24,32", help="device slots per replica, comma-separated")
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print("| slots | eviction | blind | affinity | affinity vs blind |")
    print("|---|---|---|---|---|")
    for slots in (int(x) for x in args.slots.split(",")):
        for policy in ("lru", "frequency", "ideal"):
            blind, aff = (simulate(args.adapters, args.zipf, slots, p, policy, args.requests, args.seed)
                          for p in ("blind", "affinity"))
            print(f"| {slots} | {policy} | {blind:.0f} | {aff:.0f} | {100 * (1 - aff / blind):.1f}% fewer |")


if __name__ == "__main__":
    main()
