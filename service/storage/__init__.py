"""Where adapters live: `open_store(settings)` builds the AdapterStore the service uses.

    service/storage/interfaces.py   the two protocols (AdapterIndex, BlobStore) and the record types
    service/storage/store.py        AdapterStore: name policy, the put/delete protocol, reads by sha256
    service/storage/canonical.py    CanonicalAdapter: the stored bytes and their digest, made once
    service/storage/gc.py           collect_garbage: orphans, leftovers and interrupted writes, after a grace
    service/storage/sqlite_index.py SqliteIndex       the embedded index (<store>/index.sqlite3)
    service/storage/local_blobs.py  LocalBlobStore    the embedded blob store (<store>/blobs, <store>/tmp)
    service/storage/cli.py          lora-store gc

Layout, crash rules, collection and how to add a backend: docs/storage.md.
"""

from __future__ import annotations

import os
from typing import Any

from service.storage.canonical import FILENAMES, CanonicalAdapter, adapter_digest, canonicalize
from service.storage.errors import AdapterExistsError, ForeignStoreError, InvalidAdapterNameError, MissingBlobError
from service.storage.gc import DEFAULT_GRACE_S, GcReport
from service.storage.interfaces import (
    AdapterIndex,
    AdapterRecord,
    BlobStore,
    NewAdapter,
    StorageUnavailableError,
)
from service.storage.local_blobs import LocalBlobStore
from service.storage.sqlite_index import SqliteIndex
from service.storage.store import NAME_PATTERN, RESERVED_NAMES, AdapterStore, check_name

__all__ = [
    "open_store", "AdapterStore", "AdapterIndex", "BlobStore", "AdapterRecord", "NewAdapter", "CanonicalAdapter",
    "canonicalize", "adapter_digest", "check_name", "NAME_PATTERN", "RESERVED_NAMES", "FILENAMES", "GcReport",
    "DEFAULT_GRACE_S", "SqliteIndex", "LocalBlobStore", "AdapterExistsError", "InvalidAdapterNameError",
    "MissingBlobError", "ForeignStoreError", "StorageUnavailableError", "local_store",
]


def local_store(root: str | os.PathLike) -> AdapterStore:
    """The embedded store in one directory: <root>/index.sqlite3 beside <root>/blobs and <root>/tmp."""
    blobs = LocalBlobStore(root)  # creates the directory first, so the index file has somewhere to go
    return AdapterStore(SqliteIndex(blobs.root / "index.sqlite3"), blobs, location=str(root))


def open_store(settings: Any) -> AdapterStore:
    """The store `settings` describe. Opening deletes nothing (see collect_garbage).

    Today: the embedded store, a SQLite index and a blob directory, both under `settings.store`.
    Other backends plug in here, chosen by URL settings: build the index and the blob store, then wrap them.
    """
    if settings.store is None:
        raise ValueError("no store directory: the app resolves the default (./store/<model>-<identity>) once the "
                         "base model is loaded")
    return local_store(settings.store)
