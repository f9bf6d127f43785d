"""Fixtures for the storage contract: every test taking `index`, `blobs` or `store` runs once per backend.

`index_spec` / `blob_spec` are (kind, location) pairs: `open_index(*index_spec)` opens another connection
to the same index (a second process, as far as the backend can tell). The shared backends run on the
session's real servers (tests/conftest.py; its `s3_env` sets the AWS_* variables), started only when a test
asks for them; where one cannot run, its parameters skip with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from storage_backends import BLOB_KINDS, INDEX_KINDS, new_location, open_blobs, open_index

from service.storage import AdapterIndex, AdapterStore, BlobStore


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
