"""The route tests' apps keep adapters where `--store-backend` says: the embedded store, or PostgreSQL + S3."""

import json

import pytest


def test_the_apps_use_the_store_backend_asked_for(bert_client, request: pytest.FixtureRequest):
    store = json.dumps(bert_client.get("/v1/state").json()["store"])
    if request.config.getoption("store_backend") == "shared":
        assert "postgresql://" in store and "s3://" in store, store
    else:
        assert "postgresql://" not in store and "s3://" not in store, store
