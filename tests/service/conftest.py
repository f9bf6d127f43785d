"""Shared fixtures: tiny local base models (built once per session) and running apps on them.

Each `*_client` is a TestClient over a live app (lifespan started: store open, engine running), with
auth on and the admin key sent by default. Tests share these apps, so each test names its adapters
with `unique` and leaves nothing merged.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import http_testkit
import pytest
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, bearer, build_bert, build_classifier, build_gpt2, make_settings

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="session", autouse=True)
def _store_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """`--store-backend shared`: the apps below keep adapters in the real PostgreSQL + S3 servers (tests/conftest.py),
    so the same route tests run against the shared store too. Without the servers, those runs skip, with why."""
    if request.config.getoption("store_backend") != "shared":
        yield
        return
    postgres_url, s3 = request.getfixturevalue("postgres_url"), request.getfixturevalue("s3_env")  # AWS_* set
    http_testkit.SHARED_STORE = {"postgres_url": postgres_url, "bucket": s3["bucket"]}
    try:
        yield
    finally:
        http_testkit.SHARED_STORE = None


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"bert": build_bert(root / "bert"), "cls": build_classifier(root / "cls"),
            "gpt2": build_gpt2(root / "gpt2")}


def _client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        yield client


@pytest.fixture(scope="session")
def bert_client(model_dirs, tmp_path_factory) -> Iterator[TestClient]:
    yield from _client(make_settings(model_dirs["bert"], tmp_path_factory.mktemp("bert-store"), max_rank=16,
                                     max_upload_bytes="1MiB"))


@pytest.fixture(scope="session")
def gpt2_client(model_dirs, tmp_path_factory) -> Iterator[TestClient]:
    yield from _client(make_settings(model_dirs["gpt2"], tmp_path_factory.mktemp("gpt2-store")))


@pytest.fixture(scope="session")
def cls_client(model_dirs, tmp_path_factory) -> Iterator[TestClient]:
    yield from _client(make_settings(model_dirs["cls"], tmp_path_factory.mktemp("cls-store")))


@pytest.fixture
def unique() -> str:
    """A fresh adapter name, so tests sharing an app never collide."""
    return f"t-{uuid.uuid4().hex[:10]}"
