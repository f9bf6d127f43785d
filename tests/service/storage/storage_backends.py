"""The backends the storage tests run against, by kind and location (a string, so a subprocess can reopen
them). Adding a backend: one branch in `open_index` or `open_blobs`, one in `new_location`, and its kind in
INDEX_KINDS or BLOB_KINDS (skipped, with the reason, where its server cannot run).

    sqlite    <tmp>/index.sqlite3                   SqliteIndex(location)
    postgres  create_database(postgres_url)         PostgresIndex(location)      (tests/infra.py's PostgreSQL 15)
    local     <tmp>/blobs-root                      LocalBlobStore(location)
    s3        s3://lora-test/<random>               S3BlobStore(location)        (SeaweedFS; endpoint and keys
                                                                                  from AWS_*, set by the s3 fixture)
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from service.storage import AdapterIndex, BlobStore, LocalBlobStore, SqliteIndex

INDEX_KINDS = ["sqlite", "postgres"]
BLOB_KINDS = ["local", "s3"]


def new_location(kind: str, tmp_path: Path, servers: Any = None) -> str:
    """A fresh, empty place for one test's backend. `servers(name)` returns a session fixture's value
    (request.getfixturevalue: it skips where the server cannot run)."""
    if kind == "sqlite":
        return str(tmp_path / "index.sqlite3")
    if kind == "local":
        return str(tmp_path / "blobs-root")
    if kind == "postgres":
        from infra import create_database

        return create_database(servers("postgres_url"))
    if kind == "s3":
        return f"s3://{servers('s3_env')['bucket']}/c-{uuid.uuid4().hex[:12]}"
    raise ValueError(f"unknown storage backend {kind!r}")


def open_index(kind: str, location: str) -> AdapterIndex:
    if kind == "sqlite":
        return SqliteIndex(location)
    if kind == "postgres":
        from service.storage.postgres_index import PostgresIndex

        return PostgresIndex(location)
    raise ValueError(f"unknown index backend {kind!r}")


def open_blobs(kind: str, location: str) -> BlobStore:
    if kind == "local":
        return LocalBlobStore(location)
    if kind == "s3":
        from service.storage.s3_blobs import S3BlobStore

        return S3BlobStore(location)  # endpoint, region and keys from AWS_* (the s3_env fixture)
    raise ValueError(f"unknown blob backend {kind!r}")
