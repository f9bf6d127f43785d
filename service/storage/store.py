"""`AdapterStore`: the facade the service uses over one AdapterIndex and one BlobStore.

It enforces the name rule (NAME_PATTERN, the reserved name "base": lora_common/names.py) and owns the write
protocol:

    put(name, CanonicalAdapter)   1. blobs.put(sha256, files)          put-if-absent, durable when it returns
                                  2. index.put(row)                    atomic: the name now points at the blob
                                  3. blobs.exists(sha256) or re-put    a concurrent collection may have removed it
    delete(name)                  index.delete(name)                   the blob stays, noted as an orphan

A crash (kill -9 included) between 1 and 2 leaves the old state plus an unreferenced blob; nothing ever
points at a partial blob. Nothing is deleted on open: `collect_garbage` (gc.py) removes orphans and
leftovers once they are older than a grace period. The bytes arrive canonical and hashed
(`canonicalize`, canonical.py), so a put never turns tensors back into bytes.
"""

from __future__ import annotations

import logging
from typing import Any

from adapters import LoraWeights, UnknownAdapterError, weights_from_bytes
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
from lora_common.names import NAME_PATTERN, RESERVED_NAMES, name_problem
from service.storage.canonical import FILENAMES, CanonicalAdapter
from service.storage.errors import AdapterExistsError, InvalidAdapterNameError, MissingBlobError
from service.storage.gc import DEFAULT_GRACE_S, GcReport, collect_garbage
from service.storage.interfaces import AdapterIndex, AdapterRecord, BlobStore, NewAdapter

__all__ = ["AdapterStore", "NAME_PATTERN", "RESERVED_NAMES", "check_name"]

log = logging.getLogger(__name__)


def check_name(name: str) -> str:
    """`name`, or InvalidAdapterNameError (422) with the rule it breaks (lora_common/names.py)."""
    problem = name_problem(name)
    if problem is not None:
        raise InvalidAdapterNameError(f"invalid adapter name {name!r}: {problem}", field="name")
    return name


def _taken(name: str) -> AdapterExistsError:
    return AdapterExistsError(f"adapter {name!r} already exists (use ?overwrite=true for a new version)", key=name)


class AdapterStore:
    """Synchronous and thread-safe (as its index and blob store are): call it from worker threads."""

    def __init__(self, index: AdapterIndex, blobs: BlobStore, *, location: str = "") -> None:
        self.index, self.blobs = index, blobs
        self.location = location  # for logs and messages: where this store lives

    def describe(self) -> dict[str, Any]:
        """For /v1/state: where the store lives (no password) and, with a shared index, how its name cache does."""
        describe_cache = getattr(self.index, "describe", None)
        return {"location": self.location, "name_cache": describe_cache() if callable(describe_cache) else None}

    def close(self) -> None:
        try:
            self.index.close()
        finally:
            self.blobs.close()

    # ------------------------------------------------------------------ reads
    def resolve(self, name: str) -> AdapterRecord:
        """What `name` points at now: one index lookup, no blob access (the engine keys its caches by sha256)."""
        return self.index.get(name)

    get = resolve

    def exists(self, name: str) -> bool:
        try:
            self.index.get(name)
        except UnknownAdapterError:
            return False
        return True

    def list(self, limit: int = 100, after: str | None = None) -> tuple[list[AdapterRecord], bool]:
        """One page in name order, starting after the cursor `after`; (records, has_more)."""
        return self.index.list(limit=limit, after=after)

    def count(self) -> int:
        return self.index.count()

    def read_file(self, name: str, filename: str) -> bytes:
        if filename not in FILENAMES:
            raise UnknownAdapterError(f"adapter {name!r} has no file {filename!r}; the files are {list(FILENAMES)}",
                                      key=filename)
        return self._read(self.resolve(name), (filename,))[0]

    def load_weights(self, ref: str | AdapterRecord) -> LoraWeights:
        """The stored adapter as tensors, read by sha256 (so a record always gets its own version's bytes).
        Not yet checked against a base: the engine validates."""
        record = self.resolve(ref) if isinstance(ref, str) else ref
        config_bytes, model_bytes = self._read(record, (CONFIG_NAME, WEIGHTS_NAME))
        return weights_from_bytes(config_bytes, model_bytes)

    # ------------------------------------------------------------------ writes
    def put(self, name: str, adapter: CanonicalAdapter, *, overwrite: bool = False,
            meta: dict[str, Any] | None = None) -> AdapterRecord:
        """Store `adapter` under `name` (a new version if it exists and overwrite is set)."""
        check_name(name)
        if not overwrite and self.exists(name):  # fail before writing a blob; the index checks again atomically
            raise _taken(name)
        files = adapter.files()
        self.blobs.put(adapter.sha256, files)
        new = NewAdapter(name=name, sha256=adapter.sha256, bytes=adapter.nbytes, rank=adapter.rank,
                         targets=list(adapter.targets), num_parameters=adapter.num_parameters,
                         task_type=adapter.task_type, meta=dict(meta or {}))
        record, _replaced = self.index.put(new, overwrite=overwrite)
        if not self.blobs.exists(adapter.sha256):
            # The blob existed as an old orphan and a collection removed it between steps 1 and 2.
            log.warning("store: blob %s was collected while %r was being stored; writing it again",
                        adapter.sha256[:12], name)
            self.blobs.put(adapter.sha256, files)
        return record

    def delete(self, name: str) -> AdapterRecord:
        """Remove the name; its blob stays (perhaps shared, perhaps being read) until a collection."""
        return self.index.delete(name)

    def collect_garbage(self, grace_s: float = DEFAULT_GRACE_S) -> GcReport:
        return collect_garbage(self.index, self.blobs, grace_s)

    # ------------------------------------------------------------------ internals
    def _read(self, record: AdapterRecord, filenames: tuple[str, ...]) -> list[bytes]:
        try:
            return [self.blobs.get(record.sha256, f) for f in filenames]
        except FileNotFoundError as exc:
            try:
                now = self.index.get(record.name)
            except UnknownAdapterError:
                raise UnknownAdapterError(f"adapter {record.name!r} not found", key=record.name) from exc
            if now.sha256 != record.sha256:  # replaced, and the old version collected, since `record` was read
                raise UnknownAdapterError(f"adapter {record.name!r} version {record.version} no longer exists "
                                          f"(now version {now.version})", key=record.name) from exc
            log.error("store: adapter %r (version %d) points at blob %s, which is missing", record.name,
                      record.version, record.sha256)
            raise MissingBlobError(f"the stored files of adapter {record.name!r} are missing (blob "
                                   f"{record.sha256[:12]}): delete it, or upload it again with overwrite",
                                   key=record.name) from exc
