"""Placement by rendezvous hashing, keys, the pins record and the merged /metrics (no Ray needed)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

from service.cluster.affinity import adapter_key, control_id, control_target, parse_key, placement, rendezvous_order
from service.cluster.metrics_merge import merge_metrics
from service.cluster.store_view import ClusterPins
from service.metrics import Metrics
from service.settings import Settings
from service.storage import SqliteIndex

REPLICAS = [f"r{i}" for i in range(4)]
KEYS = [adapter_key(f"a{i}", f"{i:064x}") for i in range(400)]


def test_single_server_never_imports_ray() -> None:
    code = "import sys, service.app, service.cli; assert 'ray' not in sys.modules, 'ray was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_keys_round_trip_and_control_ids() -> None:
    assert parse_key(adapter_key("support", "ab" * 32)) == ("support", "ab" * 32)
    assert parse_key("base") == ("base", None)
    assert control_target(control_id("x1")) == "x1" and control_target("a@" + "0" * 64) is None


def test_rendezvous_spreads_keys_evenly_and_deterministically() -> None:
    homes = Counter(rendezvous_order(k, REPLICAS)[0] for k in KEYS)
    assert set(homes) == set(REPLICAS) and min(homes.values()) > 400 / 4 * 0.7
    assert rendezvous_order(KEYS[0], REPLICAS) == rendezvous_order(KEYS[0], reversed(REPLICAS))


def test_removing_a_replica_moves_only_its_keys() -> None:
    before = {k: rendezvous_order(k, REPLICAS)[0] for k in KEYS}
    after = {k: rendezvous_order(k, REPLICAS[:-1])[0] for k in KEYS}
    moved = {k for k in KEYS if before[k] != after[k]}
    assert moved == {k for k in KEYS if before[k] == "r3"}  # the rest of every cache stays warm


def test_a_key_stays_home_unless_the_home_is_far_busier() -> None:
    key = KEYS[0]
    home, second, *rest = rendezvous_order(key, REPLICAS)
    stay, share = [[home], [second], rest], [[home, second], rest]
    assert placement(key, REPLICAS, {home: 3}, spill_at=4) == stay  # a short queue
    even = {r: 8 for r in REPLICAS}  # a steady load queues everywhere: every key stays home
    assert placement(key, REPLICAS, even, spill_at=4) == stay
    assert placement(key, REPLICAS, {**even, home: 19}, spill_at=4) == stay  # busier, not far busier
    assert placement(key, REPLICAS, {**even, home: 20}, spill_at=4) == share  # twice the second's plus spill_at
    assert placement(key, REPLICAS, {home: 4}, spill_at=4) == share  # an idle second: no point in waiting
    assert placement(key, ["solo"], {}, spill_at=1) == [["solo"]]


def test_a_key_with_more_than_one_replicas_worth_of_traffic_is_served_by_several() -> None:
    key = KEYS[0]
    order = rendezvous_order(key, REPLICAS)
    even = {r: 8 for r in REPLICAS}
    assert placement(key, REPLICAS, even, spill_at=4, share=0.25) == [[order[0]], [order[1]], order[2:]]
    assert placement(key, REPLICAS, even, spill_at=4, share=0.3) == [order[:2], order[2:]]
    assert placement(key, REPLICAS, even, spill_at=4, share=0.6) == [order[:3], order[3:]]
    assert placement(key, REPLICAS, even, spill_at=4, share=1.0) == [order]
    two = REPLICAS[:2]  # the benchmark's case: 60% of the traffic on two replicas
    assert placement(key, two, {}, spill_at=4, share=0.6) == [rendezvous_order(key, two)]
    assert placement(key, two, {}, spill_at=4, share=0.45)[0] == [rendezvous_order(key, two)[0]]


def test_a_home_devoted_to_a_hot_adapter_sends_the_others_to_their_second_choice() -> None:
    key = KEYS[0]
    home, second, *rest = rendezvous_order(key, REPLICAS)
    hot = next(k for k in KEYS[1:] if rendezvous_order(k, REPLICAS)[0] == home)
    guest = next(k for k in KEYS[1:] if rendezvous_order(k, REPLICAS)[0] != home)
    devoted = {home: hot}
    # A replica busy with another replica's hot adapter (as its second choice) is not devoted to it.
    assert placement(key, REPLICAS, {home: 8, second: 8}, spill_at=4, dominant={home: guest}) == [[home], [second],
                                                                                                    rest]
    assert placement(key, REPLICAS, {home: 8, second: 8}, spill_at=4, dominant=devoted) == [[second], [home], rest]
    assert placement(key, REPLICAS, {home: 2}, spill_at=4, dominant=devoted) == [[second], [home], rest]
    assert placement(key, REPLICAS, {home: 2, second: 9}, spill_at=4, dominant=devoted) == [[home], [second], rest]
    # The hot adapter stays on the home devoted to it, and spreads only when that home is far busier.
    assert placement(key, REPLICAS, {home: 12, second: 8}, spill_at=4, dominant={home: key}) == [[home], [second],
                                                                                                   rest]
    assert placement(key, REPLICAS, {home: 20, second: 8}, spill_at=4, dominant={home: key}) == [[home, second],
                                                                                                   rest]


def test_pins_record_lives_in_the_index_and_every_process_sees_it(tmp_path) -> None:
    path = tmp_path / "index.sqlite3"
    ingress, replica = (SqliteIndex(path), SqliteIndex(path))  # two processes on one store, as far as it can tell
    try:
        pins, theirs = ClusterPins(SimpleNamespace(index=ingress)), ClusterPins(SimpleNamespace(index=replica))
        assert theirs.read() == {"merged": None, "seq": 0}
        assert pins.write("support") == {"merged": "support", "seq": 1}
        assert theirs.read() == {"merged": "support", "seq": 1}
        previous, mine = pins.swap("billing")
        assert previous == {"merged": "support", "seq": 1} and mine == {"merged": "billing", "seq": 2}
        assert theirs.write("legal") == {"merged": "legal", "seq": 3}  # another ingress pins meanwhile
        assert pins.write("support", only_if=mine) is None  # so a rollback of "billing" leaves it alone
        assert pins.write(None, only_if=theirs.read()) == {"merged": None, "seq": 4}
        assert ingress.get_meta(ClusterPins.KEY) is not None
    finally:
        ingress.close()
        replica.close()


def test_metrics_merge_labels_each_replica_and_keeps_http_from_the_ingress() -> None:
    ingress, r1, r2 = Metrics(), Metrics(), Metrics()
    ingress.requests.labels("POST", "/v1/embeddings", "200").inc(3)
    r1.adapter_loads.labels(tier="device").inc(2)
    r2.adapter_loads.labels(tier="device").inc(5)
    text = merge_metrics(ingress.render(), [("r1", r1.render()), ("r2", r2.render())]).decode()
    assert 'lora_http_requests_total{method="POST",route="/v1/embeddings",status="200"} 3.0' in text
    assert 'lora_adapter_loads_total{replica="r1",tier="device"} 2.0' in text
    assert 'lora_adapter_loads_total{replica="r2",tier="device"} 5.0' in text
    assert text.count("# TYPE lora_adapter_loads_total counter") == 1


def test_cluster_mode_settings() -> None:
    assert not Settings().cluster_mode
    assert Settings(replicas=2).cluster_mode and Settings(ray_address="127.0.0.1:6379").cluster_mode
    settings = Settings(replicas=2, min_replicas=1, max_replicas=4, cluster_router="MULTIPLEX")
    assert settings.cluster_router == "multiplex"
