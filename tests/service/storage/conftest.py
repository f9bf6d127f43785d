"""Fixtures for the storage contract: every test taking `index`, `blobs` or `store` runs once per backend.

`index_spec` / `blob_spec` are (kind, location) pairs: `open_index(*index_spec)` opens another connection
to the same index (a second process, as far as the backend can tell). The shared backends run on the
session's real servers (tests/conftest.py), started only when a test asks for them; where one cannot run,
its parameters skip with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from storage_backends import BLOB_KINDS, INDEX_KINDS, new_location, open_blobs, open_index

from service.storage import AdapterIndex, AdapterStore, BlobStore

_AWS = {"AWS_ENDPOINT_URL": "endpoint_url", "AWS_ACCESS_KEY_ID": "access_key_id",
        "AWS_SECRET_ACCESS_KEY": "secret_access_key", "AWS_DEFAULT_REGION": "region", "AWS_REGION": "region"}


@pytest.fixture(scope="session")
def s3_env(s3_settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The standard AWS_* variables for the test S3 server, for the whole session: S3BlobStore(location) then
    finds it as a deployment would, in this process and in the crash tests' subprocesses. Session-wide but not
    autouse: only a test that asks for an s3 backend starts SeaweedFS."""
    saved = {var: os.environ.get(var) for var in _AWS}
    os.environ.update({var: str(s3_settings[key]) for var, key in _AWS.items()})
    yield s3_settings
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


@pytest.fixture(params=INDEX_KINDS)
def index_spec(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    return request.param, new_location(request.param, tmp_path, request.getfixturevalue)


@pytest.fixture(params=BLOB_KINDS)
def blob_spec(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    return request.param, new_location(request.param, tmp_path, request.getfixturevalue)


@pytest.fixture
def index(index_spec: tuple[str, str]) -> Iterator[AdapterIndex]:
    opened = open_index(*index_spec)
    yield opened
    opened.close()


@pytest.fixture
def blobs(blob_spec: tuple[str, str]) -> Iterator[BlobStore]:
    opened = open_blobs(*blob_spec)
    yield opened
    opened.close()


@pytest.fixture
def store(index: AdapterIndex, blobs: BlobStore) -> AdapterStore:
    return AdapterStore(index, blobs)
