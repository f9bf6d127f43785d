"""End to end on a real local Ray cluster: 2 replicas of a tiny BERT behind the service's HTTP API."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from cluster_testkit import TEXTS, close, embed, new_name, state, upload, wait

pytestmark = pytest.mark.cluster


def test_inference_across_replicas_equals_a_single_server(cluster, single) -> None:
    client = cluster["client"]
    names = [new_name() for _ in range(10)]
    for i, name in enumerate(names):
        upload(client, name, seed=i)
        upload(single, name, seed=i)
    for name in [*names, "base"]:
        assert close(embed(client, name), embed(single, name)), name
    replicas = state(client)["replicas"]
    assert len(replicas) == 2 and all("error" not in r for r in replicas)
    assert all(r["requests_served"] > 0 for r in replicas)  # ten adapters: both replicas are home to some
    for name in names:  # a second round is served warm, from the same home
        embed(client, name)
    again = state(client)["replicas"]
    assert sum(r["cold_loads"] for r in again) == sum(r["cold_loads"] for r in replicas)


def test_overwrite_is_never_answered_stale(cluster, single) -> None:
    client, name = cluster["client"], new_name()
    upload(client, name, seed=11)
    old = embed(client, name)
    upload(single, name, seed=12)
    new = embed(single, name)
    assert not close(old, new)
    record = upload(client, name, seed=12, overwrite=True)
    assert record["version"] == 2
    for _ in range(20):  # every request after the overwrite returned sees version 2
        assert close(embed(client, name), new)


def test_delete_then_404(cluster) -> None:
    client, name = cluster["client"], new_name()
    upload(client, name, seed=21)
    embed(client, name)
    assert client.delete(f"/v1/adapters/{name}").status_code == 200
    r = client.post("/v1/embeddings", json={"model": name, "input": TEXTS})
    assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_adapter_error"


def test_explicit_merge_reaches_every_replica_and_unmerge_undoes_it(cluster, single) -> None:
    client, name = cluster["client"], new_name()
    upload(client, name, seed=31)
    upload(single, name, seed=31)
    r = client.post(f"/v1/adapters/{name}/merge")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["merged_adapter"] == name and body["pinned"]
    assert [x["merged_adapter"] for x in body["replicas"]] == [name, name]
    assert all(x["pinned"] for x in body["replicas"])
    assert close(embed(client, name), embed(single, name))  # merged or not, the same answer
    assert close(embed(client, "base"), embed(single, "base"))
    r = client.post("/v1/unmerge")
    assert r.status_code == 200 and r.json()["merged_adapter"] is None
    state = client.get("/v1/state", params={"fingerprints": True}).json()
    assert all(x["merged_adapter"] is None and x["fingerprint"] == x["pristine_fingerprint"]
               for x in state["replicas"])


def test_metrics_cover_every_replica(cluster) -> None:
    client = cluster["client"]
    embed(client, "base")
    ids = {r["replica"] for r in state(client)["replicas"]}
    text = client.get("/metrics").text
    assert "lora_http_requests_total" in text
    for rid in ids:
        assert f'replica="{rid}"' in text


def test_killed_replica_is_restarted_and_requests_continue(cluster) -> None:
    client, name = cluster["client"], new_name()
    upload(client, name, seed=41)
    assert client.post(f"/v1/adapters/{name}/merge").status_code == 200  # the pin must survive the restart
    before = state(client)["replicas"]
    victim = before[0]
    results: list[tuple[int, dict | None]] = []
    stop = threading.Event()

    def load() -> None:  # 4 clients, one request at a time each: at most 4 in flight anywhere
        import httpx

        with httpx.Client(base_url=str(client.base_url), headers=dict(client.headers), timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/embeddings", json={"model": name if len(results) % 2 else "base", "input": TEXTS})
                results.append((r.status_code, r.json() if r.status_code != 200 else None))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = len(results)

        def recovered() -> list | None:
            replicas = state(client)["replicas"]
            fresh = [r for r in replicas if "error" not in r]
            ids = {r["replica"] for r in fresh}
            return fresh if len(fresh) == 2 and victim["replica"] not in ids else None

        replicas = wait(recovered, 60, "the killed replica to be replaced")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    failures = [(s, b) for s, b in results if s != 200]
    assert len(results) > killed_at + 10  # requests went on during and after the restart
    assert len(failures) <= 4, failures  # at most the ones in flight on the killed replica
    for status, body in failures:
        assert status >= 500 and set(body["error"]) == {"message", "type", "key"}
    assert all(r["merged_adapter"] == name for r in replicas)  # the new replica applied the pin
    assert client.post("/v1/unmerge").status_code == 200


def test_full_restart_keeps_the_adapters(cluster) -> None:
    from ray import serve

    from service.cluster.launch import deploy

    client, name = cluster["client"], new_name()
    upload(client, name, seed=51)
    before = embed(client, name)
    serve.shutdown()
    deploy(cluster["settings"])
    assert close(embed(client, name), before)
    listed = client.get("/v1/adapters", params={"limit": 1000}).json()["data"]
    assert name in {a["name"] for a in listed}


def test_every_listener_of_the_cluster_is_on_loopback(cluster) -> None:
    """Ray's GCS, raylet, workers and Serve replicas (and anything else this session started) listen on
    127.0.0.1 only: a local cluster is one machine and nothing outside it has to reach it."""
    import ipaddress

    import psutil

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip)
        return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 included

    mine = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = [(c.laddr.ip, c.laddr.port, c.pid) for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in mine]
    assert len(listening) > 3  # Ray's own listeners were seen at all
    exposed = [(ip, port, psutil.Process(pid).name()) for ip, port, pid in listening if not loopback(ip)]
    assert not exposed
