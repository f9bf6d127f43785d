"""service/routes/health.py: liveness, readiness, Prometheus metrics; no key needed."""

from __future__ import annotations

from fastapi.testclient import TestClient
from http_testkit import make_settings

from service.app import create_app


def test_health_and_ready_need_no_key(bert_client: TestClient):
    for path, body in (("/healthz", {"status": "ok"}), ("/readyz", {"status": "ready"})):
        r = bert_client.get(path, headers={"Authorization": ""})
        assert r.status_code == 200 and r.json() == body


def test_not_ready_before_startup_and_after_shutdown(model_dirs, tmp_path):
    app = create_app(make_settings(model_dirs["gpt2"], tmp_path))
    client = TestClient(app)  # no `with`: the lifespan has not run, nothing is loaded
    assert client.get("/healthz").status_code == 200
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "not ready"}
    with client:
        assert client.get("/readyz").status_code == 200
    assert client.get("/readyz").status_code == 503
    r = client.post("/v1/completions", json={"model": "base", "prompt": "x"},
                    headers={"Authorization": f"Bearer {app.state.settings.admin_keys[0]}"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "not_ready"


def test_metrics_is_prometheus_text(bert_client: TestClient):
    bert_client.get("/healthz")
    r = bert_client.get("/metrics", headers={"Authorization": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'lora_http_requests_total{method="GET",route="/healthz",status="200"}' in r.text
