"""Where adapters live: `open_store(settings)` builds the AdapterStore the service uses.

    service/storage/interfaces.py   the two protocols (AdapterIndex, BlobStore) and the record types
    service/storage/store.py        AdapterStore: name policy, the put/delete protocol, reads by sha256
    service/storage/canonical.py    CanonicalAdapter: the stored bytes and their digest, made once
    service/storage/gc.py           collect_garbage: orphans, leftovers and interrupted writes, after a grace
    service/storage/sqlite_index.py SqliteIndex       the embedded index (<store>/index.sqlite3)
    service/storage/local_blobs.py  LocalBlobStore    the embedded blob store (<store>/blobs, <store>/tmp)
    service/storage/backends.py     open_backends     the shared ones named by --index-url / --blob-url
    service/storage/cli.py          lora-store gc

Layout, crash rules, collection and how to add a backend: docs/storage.md; several servers: docs/shared-store.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service.storage.canonical import FILENAMES, CanonicalAdapter, adapter_digest, canonicalize
from service.storage.errors import AdapterExistsError, ForeignStoreError, InvalidAdapterNameError, MissingBlobError
from service.storage.gc import DEFAULT_GRACE_S, GcReport
from service.storage.interfaces import (
    AdapterIndex,
    AdapterRecord,
    BlobStore,
    ChangesPrunedError,
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
    "MissingBlobError", "ForeignStoreError", "StorageUnavailableError", "ChangesPrunedError", "local_store",
]


def local_store(root: str | os.PathLike) -> AdapterStore:
    """The embedded store in one directory: <root>/index.sqlite3 beside <root>/blobs and <root>/tmp."""
    blobs = LocalBlobStore(root)  # creates the directory first, so the index file has somewhere to go
    return AdapterStore(SqliteIndex(blobs.root / "index.sqlite3"), blobs, location=str(root))


def open_store(settings: Any) -> AdapterStore:
    """The store `settings` describe. Opening deletes nothing (see collect_garbage).

    --index-url / --blob-url name shared backends (open_backends); whatever they leave out is local, under
    --store: the SQLite index at <store>/index.sqlite3, the blobs in <store>/blobs. Any mix works. With both
    URLs set nothing local is touched, and --store may be None. An unreachable backend raises
    StorageUnavailableError naming it ("index" or "blobs"), here or at its first call.
    """
    from service.storage.backends import describe_url, open_backends

    index, blobs = open_backends(settings)
    if index is None or blobs is None:
        if settings.store is None:
            for opened in (index, blobs):
                if opened is not None:
                    opened.close()
            raise ValueError("no store directory: the app resolves the default (./store/<model>-<identity>) once "
                             "the base model is loaded")
        if blobs is None:
            blobs = LocalBlobStore(settings.store)  # creates the directory first, for the index file
        if index is None:
            Path(settings.store).mkdir(parents=True, exist_ok=True)
            index = SqliteIndex(Path(settings.store) / "index.sqlite3")
    index_url, blob_url = getattr(settings, "index_url", None), getattr(settings, "blob_url", None)
    if not (index_url or blob_url):
        location = str(settings.store)
    else:
        index_at = describe_url(index_url) if index_url else f"{settings.store}/index.sqlite3"
        location = f"index {index_at}, blobs {describe_url(blob_url) if blob_url else f'{settings.store}/blobs'}"
    return AdapterStore(index, blobs, location=location)
