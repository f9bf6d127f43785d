"""service/metrics.py: a registry per app; HTTP, adapter-load, cache and merge metrics are exported."""

from __future__ import annotations

from fastapi.testclient import TestClient
from http_testkit import BERT_TARGETS, make_adapter, peft_files
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_two_apps_do_not_share_a_registry():
    a, b = Metrics(), Metrics()
    a.merges.labels(kind="merge").inc()
    assert b"lora_merges_total{kind=\"merge\"} 1.0" in a.render()
    assert b"lora_merges_total{kind=\"merge\"}" not in b.render()


def test_engine_facing_attributes_exist():
    m = Metrics()
    m.adapter_loads.labels(tier="disk").inc()
    m.cache_hits.labels(tier="host").inc()
    m.cache_misses.labels(tier="device").inc()
    m.merges.labels(kind="switch").inc()
    m.batch_size.observe(8)
    m.merge_mode.set(1)
    m.forward_seconds.observe(0.01)
    text = m.render().decode()
    for name in ("lora_adapter_loads_total", "lora_adapter_cache_hits_total", "lora_adapter_cache_misses_total",
                 "lora_merges_total", "lora_batch_size_bucket", "lora_merged", "lora_forward_seconds_bucket"):
        assert name in text


def test_requests_loads_and_merges_are_counted(bert_client: TestClient, unique: str):
    bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS)))
    bert_client.post("/v1/embeddings", json={"model": unique, "input": "x"})
    bert_client.get(f"/v1/adapters/{unique}-missing")
    try:
        bert_client.post(f"/v1/adapters/{unique}/merge")
    finally:
        bert_client.post("/v1/unmerge")
    samples = _samples(bert_client.get("/metrics").text)
    key = ("lora_http_requests_total", (("method", "GET"), ("route", "/v1/adapters/{name}"), ("status", "404")))
    assert samples[key] >= 1  # by route template, never by adapter name
    assert not any(unique in str(labels) for _, labels in samples)
    assert samples[("lora_adapter_uploads_total", (("outcome", "stored"),))] >= 1
    assert samples[("lora_adapter_loads_total", (("tier", "device"),))] >= 1
    assert samples[("lora_merges_total", (("kind", "merge"),))] >= 1
    assert samples[("lora_merges_total", (("kind", "unmerge"),))] >= 1
    assert samples[("lora_merged", ())] == 0
    assert samples[("lora_http_request_seconds_count", (("method", "POST"), ("route", "/v1/embeddings")))] >= 1
    assert samples[("lora_batch_size_count", ())] >= 1


def test_client_chosen_methods_do_not_become_label_values(bert_client: TestClient):
    for i in range(3):
        bert_client.request(f"BREW{i}", "/healthz")
    samples = _samples(bert_client.get("/metrics").text)
    methods = {dict(labels).get("method") for _, labels in samples if dict(labels).get("method")}
    assert not any(m.startswith("BREW") for m in methods) and "other" in methods
