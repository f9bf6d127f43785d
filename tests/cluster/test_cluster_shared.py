"""End to end on the shared store: a real local Ray cluster with `--index-url postgresql://...` and
`--blob-url s3://...` (the real PostgreSQL and SeaweedFS servers), 2 replicas behind 2 ingresses. What a
cluster spread over machines relies on: the answers, overwrites and deletes seen through either ingress,
the merge pins in PostgreSQL, and a full restart that finds everything in the shared store."""

from __future__ import annotations

import json

import pytest
from cluster_testkit import TEXTS, close, embed, new_name, state, upload

pytestmark = pytest.mark.cluster


def _pins(settings) -> dict:
    from service.cluster.store_view import ClusterPins
    from service.storage.postgres_index import PostgresIndex

    index = PostgresIndex(settings.index_url)
    try:
        raw = index.get_meta(ClusterPins.KEY)
    finally:
        index.close()
    return json.loads(raw) if raw else {"merged": None, "seq": 0}


def test_shared_store_serves_like_a_single_server_through_either_ingress(shared_cluster, single) -> None:
    from ray import serve

    client = shared_cluster["client"]
    ingresses = serve.status().applications["lora"].deployments["LoraIngress"].replica_states
    assert ingresses.get("RUNNING") == 2, ingresses
    names = [new_name() for _ in range(10)]
    for i, name in enumerate(names):
        upload(client, name, seed=100 + i)
        upload(single, name, seed=100 + i)
    for name in [*names, "base"]:
        assert close(embed(client, name), embed(single, name)), name
    replicas = state(client)["replicas"]
    assert len(replicas) == 2 and all("error" not in r for r in replicas)
    assert all(r["requests_served"] > 0 for r in replicas)  # ten adapters: both replicas are home to some

    name = names[0]  # an overwrite through one ingress is never answered stale by the other
    upload(single, name, seed=200, overwrite=True)
    new = embed(single, name)
    assert upload(client, name, seed=200, overwrite=True)["version"] == 2
    for _ in range(20):  # Serve's proxy spreads these over both ingresses
        assert close(embed(client, name), new)

    assert client.delete(f"/v1/adapters/{names[1]}").status_code == 200
    for _ in range(6):
        r = client.post("/v1/embeddings", json={"model": names[1], "input": TEXTS})
        assert r.status_code == 404 and r.json()["error"]["type"] == "unknown_adapter_error"


def test_shared_store_pins_live_in_postgres_and_reach_every_replica(shared_cluster, single) -> None:
    client, settings, name = shared_cluster["client"], shared_cluster["settings"], new_name()
    upload(client, name, seed=301)
    upload(single, name, seed=301)
    seq = _pins(settings)["seq"]
    r = client.post(f"/v1/adapters/{name}/merge")
    assert r.status_code == 200, r.text
    assert [x["merged_adapter"] for x in r.json()["replicas"]] == [name, name]
    assert _pins(settings) == {"merged": name, "seq": seq + 1}
    for _ in range(6):  # either ingress reads the same pins
        body = state(client)
        assert body["pinned"] and body["merged_adapter"] == name
    assert close(embed(client, name), embed(single, name))
    assert client.post("/v1/unmerge").status_code == 200
    assert _pins(settings) == {"merged": None, "seq": seq + 2}
    assert all(x["merged_adapter"] is None for x in state(client)["replicas"])


def test_shared_store_full_restart_comes_back_with_adapters_and_pins(shared_cluster) -> None:
    from ray import serve

    from service.cluster.launch import deploy

    client, name = shared_cluster["client"], new_name()
    upload(client, name, seed=401)
    before = embed(client, name)
    assert client.post(f"/v1/adapters/{name}/merge").status_code == 200
    serve.shutdown()
    deploy(shared_cluster["settings"])
    assert close(embed(client, name), before)
    listed = client.get("/v1/adapters", params={"limit": 1000}).json()["data"]
    assert name in {a["name"] for a in listed}
    body = state(client)  # the new replicas read the pin from PostgreSQL on start
    assert body["pinned"] and [x["merged_adapter"] for x in body["replicas"]] == [name, name]
    assert client.post("/v1/unmerge").status_code == 200
    assert not (shared_cluster["settings"].store / "index.sqlite3").exists()  # nothing went to the local store
