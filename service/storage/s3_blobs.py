"""BlobStore on an S3-compatible object store (AWS S3, MinIO, SeaweedFS, Ceph RGW), shared by several servers.

    s3://bucket/prefix/<sha[:2]>/<sha256>/adapter_config.json
                                          adapter_model.safetensors
                                          COMPLETE            written last: the blob exists from here on

S3 has no multi-object transaction, so a blob becomes visible through its marker: the two files are
written first, then the empty COMPLETE object; `exists`, `get` and `list` only count blobs whose
marker is there, and `delete` removes the marker first. Every object is written with a conditional
create (`If-None-Match: *`): blobs are named by their content, so a 412 PreconditionFailed means the
same bytes are already there and is a success. Files of a writer that died before its marker are
removed by `collect_temporary` once older than a grace period.

Endpoint, region and credentials come from the arguments, else from boto3's standard sources
(AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ~/.aws, instance roles).
An unreachable endpoint (or a 5xx) raises StorageUnavailableError("blobs", ...).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.storage.interfaces import StorageUnavailableError

__all__ = ["S3BlobStore", "MARKER"]

MARKER = "COMPLETE"
T = TypeVar("T")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_FILE = re.compile(r"^[A-Za-z0-9._-]+$")
_MISSING = {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


class S3BlobStore:
    def __init__(self, url: str, *, endpoint_url: str | None = None, region: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 timeout_s: float = 10.0, create_bucket: bool = True) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"blob URL {url!r}: expected s3://bucket/prefix")
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.url = url
        # Few retries and short timeouts: a dead endpoint should become a 503 in seconds, not minutes.
        config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=timeout_s,
                        read_timeout=timeout_s, max_pool_connections=32, s3={"addressing_style": "path"})
        session = boto3.session.Session()  # clients are thread-safe; a session is not, so one of our own
        self._s3 = session.client("s3", endpoint_url=endpoint_url, region_name=region,
                                  aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                                  config=config)
        self._complete: set[str] = set()  # shas seen complete: blobs are immutable, their marker needs no re-check
        self._lock = threading.Lock()
        if create_bucket:
            self._ensure_bucket(region)

    # ------------------------------------------------------------------ plumbing
    def _key(self, sha256: str, filename: str) -> str:
        if not _SHA.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256!r}")
        if not _FILE.fullmatch(filename) or filename == MARKER:
            raise ValueError(f"bad blob file name {filename!r}")
        return self._blob_prefix(sha256) + filename

    def _blob_prefix(self, sha256: str) -> str:
        return f"{self.prefix}/{sha256[:2]}/{sha256}/" if self.prefix else f"{sha256[:2]}/{sha256}/"

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if status >= 500 or status in (401, 403):
                raise StorageUnavailableError("blobs", f"S3 {self.bucket}: {exc}") from exc
            raise
        except BotoCoreError as exc:  # connection refused, timeouts, DNS
            raise StorageUnavailableError("blobs", f"S3 endpoint unreachable ({self.bucket}): {exc}") from exc

    def _ensure_bucket(self, region: str | None) -> None:
        try:
            self._call(lambda: self._s3.head_bucket(Bucket=self.bucket))
            return
        except ClientError as exc:
            if _code(exc) not in _MISSING:
                raise
        args: dict[str, Any] = {"Bucket": self.bucket}
        if region and region != "us-east-1":
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call(lambda: self._s3.create_bucket(**args))
        except ClientError as exc:
            if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise RuntimeError(f"bucket {self.bucket!r} does not exist and could not be created: {exc}") from exc

    def _create(self, key: str, body: bytes) -> bool:
        """Put-if-absent; False if the object was there already (412: same content, by construction)."""
        try:
            self._call(lambda: self._s3.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*"))
            return True
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return False
            raise

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return self._call(lambda: self._s3.head_object(Bucket=self.bucket, Key=key))
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise

    # ------------------------------------------------------------------ BlobStore
    def put(self, sha256: str, files: Mapping[str, bytes]) -> bool:
        if self.exists(sha256):
            return False
        for filename, data in files.items():
            self._create(self._key(sha256, filename), bytes(data))
        written = self._create(self._blob_prefix(sha256) + MARKER, b"")  # the commit point
        with self._lock:
            self._complete.add(sha256)
        return written

    def exists(self, sha256: str) -> bool:
        self._key(sha256, "x")  # validates the digest
        return self._head(self._blob_prefix(sha256) + MARKER) is not None

    def get(self, sha256: str, filename: str) -> bytes:
        key = self._key(sha256, filename)
        with self._lock:
            known = sha256 in self._complete
        if not known:
            if not self.exists(sha256):
                raise FileNotFoundError(f"blob {sha256} is not in s3://{self.bucket}/{self.prefix}")
            with self._lock:
                self._complete.add(sha256)
        try:
            return self._call(lambda: self._s3.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        except ClientError as exc:
            if _code(exc) in _MISSING:
                with self._lock:
                    self._complete.discard(sha256)
                raise FileNotFoundError(f"blob {sha256} has no file {filename!r}") from exc
            raise

    def delete(self, sha256: str) -> None:
        prefix = self._blob_prefix(sha256)
        self._key(sha256, "x")
        with self._lock:
            self._complete.discard(sha256)
        # The marker first: from then on readers see no blob, whatever happens to the files' deletion.
        self._call(lambda: self._s3.delete_object(Bucket=self.bucket, Key=prefix + MARKER))
        keys = [o["Key"] for o in self._objects(prefix)]
        if keys:
            self._call(lambda: self._s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}))

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        iterator = iter(pages)
        while True:
            page = self._call(lambda: next(iterator, None))
            if page is None:
                return
            yield from page.get("Contents", [])

    def _root(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    def list(self) -> Iterator[tuple[str, float]]:
        for obj in self._objects(self._root()):
            parts = obj["Key"][len(self._root()):].split("/")
            if len(parts) == 3 and parts[2] == MARKER and _SHA.fullmatch(parts[1]):
                yield parts[1], obj["LastModified"].timestamp()

    def collect_temporary(self, older_than_s: float) -> int:
        """Remove the files of blobs that never got their marker, if all of them are older than the grace."""
        blobs: dict[str, list[dict[str, Any]]] = {}
        for obj in self._objects(self._root()):
            parts = obj["Key"][len(self._root()):].split("/")
            if len(parts) == 3 and _SHA.fullmatch(parts[1]):
                blobs.setdefault(parts[1], []).append(obj)
        cutoff, removed = time.time() - older_than_s, 0
        for sha, objects in blobs.items():
            if any(o["Key"].endswith("/" + MARKER) for o in objects):
                continue
            if any(o["LastModified"].timestamp() > cutoff for o in objects):
                continue  # maybe a writer still at work
            if self.exists(sha):  # completed since the listing
                continue
            keys = [o["Key"] for o in objects]
            self._call(lambda keys=keys: self._s3.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True}))
            removed += 1
        return removed

    def close(self) -> None:
        self._s3.close()


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))
