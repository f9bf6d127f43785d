"""Which index and blob store a server uses, from its settings: the shared ones, or None for "the local default".

    --index-url postgresql://...   PostgresIndex, behind a CachedIndex unless --name-cache-ttl-s 0
    --blob-url  s3://bucket/prefix S3BlobStore (endpoint and keys from the AWS_* variables)
    --blob-url  file:///path       LocalBlobStore on a shared volume (or a bare path)

Any mix works: a PostgreSQL index with blobs on an NFS volume, say. `open_store(settings)` fills the
Nones with the SQLite index and local blobs under --store. The drivers (psycopg, boto3) are imported
only when asked for: they are the optional `shared` extra.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from service.storage.interfaces import AdapterIndex, BlobStore, StorageUnavailableError

__all__ = ["open_backends", "open_index", "open_blob_store", "describe_url", "unreachable_message"]


def open_index(url: str, *, name_cache_ttl_s: float = 5.0) -> AdapterIndex:
    try:
        from service.storage.postgres_index import PostgresIndex
    except ImportError as exc:
        raise RuntimeError(f"--index-url needs psycopg and psycopg-pool: pip install 'lora-service[shared]' "
                           f"({exc})") from exc
    index = PostgresIndex(url)
    if name_cache_ttl_s <= 0:
        return index
    from service.storage.name_cache import CachedIndex

    return CachedIndex(index, ttl_s=name_cache_ttl_s)


def open_blob_store(url: str) -> BlobStore:
    if url.startswith("s3://"):
        try:
            from service.storage.s3_blobs import S3BlobStore
        except ImportError as exc:
            raise RuntimeError(f"an s3:// --blob-url needs boto3: pip install 'lora-service[shared]' ({exc})") from exc
        return S3BlobStore(url)
    path = Path(unquote(urlparse(url).path)) if url.startswith("file://") else Path(url)
    from service.storage.local_blobs import LocalBlobStore  # the seam's local directory store

    return LocalBlobStore(path)


def describe_url(url: str) -> str:
    """`url` for messages and logs: without its password; an s3:// URL with the endpoint it will reach."""
    shown = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)
    if url.startswith("s3://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        shown += f" (endpoint {endpoint})" if endpoint else " (endpoint: AWS's default)"
    return shown


def open_backends(settings: Any) -> tuple[AdapterIndex | None, BlobStore | None]:
    """(index, blobs) named by settings.index_url / settings.blob_url; None where the local default applies."""
    index_url, blob_url = getattr(settings, "index_url", None), getattr(settings, "blob_url", None)
    index = open_index(index_url, name_cache_ttl_s=getattr(settings, "name_cache_ttl_s", 5.0)) if index_url else None
    try:
        blobs = open_blob_store(blob_url) if blob_url else None
    except BaseException:
        if index is not None:
            with contextlib.suppress(Exception):
                index.close()
        raise
    return index, blobs


def unreachable_message(settings: Any, exc: StorageUnavailableError) -> str:
    """Which backend could not be reached, at which URL (no password), and why: for the refusal at start-up."""
    url = getattr(settings, "index_url" if exc.component == "index" else "blob_url", None)
    what = {"index": "adapter index", "blobs": "adapter blob store"}.get(exc.component, exc.component)
    where = describe_url(url) if url else str(getattr(settings, "store", ""))
    return f"the {what} ({exc.component}) at {where} is unreachable: {exc}"
