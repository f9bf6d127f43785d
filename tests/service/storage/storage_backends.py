"""The backends the storage tests run against, by kind and location (a string, so a subprocess can reopen
them). Adding a backend: one branch in `open_index` or `open_blobs`, one in `new_location`, and its kind in
INDEX_KINDS or BLOB_KINDS (skipped where its server is not configured)."""

from __future__ import annotations

from pathlib import Path

from service.storage import AdapterIndex, BlobStore, LocalBlobStore, SqliteIndex

INDEX_KINDS = ["sqlite"]
BLOB_KINDS = ["local"]


def new_location(kind: str, tmp_path: Path) -> str:
    """A fresh, empty place for one test's backend."""
    if kind == "sqlite":
        return str(tmp_path / "index.sqlite3")
    if kind == "local":
        return str(tmp_path / "blobs-root")
    raise ValueError(f"unknown storage backend {kind!r}")


def open_index(kind: str, location: str) -> AdapterIndex:
    if kind == "sqlite":
        return SqliteIndex(location)
    raise ValueError(f"unknown index backend {kind!r}")


def open_blobs(kind: str, location: str) -> BlobStore:
    if kind == "local":
        return LocalBlobStore(location)
    raise ValueError(f"unknown blob backend {kind!r}")
