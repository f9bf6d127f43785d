"""The storage seam: where adapter index rows and adapter bytes live.

    AdapterStore (service/storage/store.py: names, canonical bytes, digest, the put/delete protocol)
        ├── AdapterIndex   names -> versions -> sha256 records   (SQLite file | PostgreSQL)
        └── BlobStore      sha256 -> the two PEFT files, immutable (local directory | S3-compatible)

A backend is a plug: implement one of these two protocols and the contract suite
(tests/service/storage/) runs against it unchanged. Both are synchronous and thread-safe; the service
calls them from worker threads, never from the event loop.

Rules every implementation keeps:
  * A blob is complete before any index row points at it (the store writes the blob first).
  * Blobs are content-addressed and written put-if-absent; writing bytes that exist is a no-op.
  * The index assigns versions: 1 for a new name, last + 1 after an overwrite, and never reuses a
    version, even after a delete.
  * Every put and delete bumps the index's sequence number and records (seq, name), so another process
    can follow changes with `changes_since` (PostgreSQL adds LISTEN/NOTIFY on top). Sequence numbers only
    grow. `prune_changes` (run by `collect_garbage`) drops old records but always keeps the newest, so
    `sequence()` never goes back; a follower that fell behind the pruned point learns it from
    `changes_since` (ChangesPrunedError) and starts over from the present.
  * The index never deletes blobs. A put or delete that leaves a sha256 with no row records it as an
    orphan (with the time); `collect_garbage` (service/storage/gc.py) removes blobs orphaned for longer
    than a grace period, so it is safe while another process uploads the same bytes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = ["AdapterRecord", "NewAdapter", "AdapterIndex", "BlobStore", "StorageUnavailableError",
           "ChangesPrunedError", "checked_changes"]


class StorageUnavailableError(RuntimeError):
    """The index or the blob store cannot be reached (connection refused, timeout). Answered as 503;
    `component` names which ("index" or "blobs")."""

    def __init__(self, component: str, message: str) -> None:
        super().__init__(message)
        self.component = component


class ChangesPrunedError(RuntimeError):
    """`changes_since(since)` cannot list every change after `since`: some were pruned (the oldest kept is
    `oldest`, past since + 1). The caller has missed changes it can no longer read, so it must treat
    everything as changed (drop its whole cache) and carry on from `latest`, the newest change now."""

    def __init__(self, since: int, oldest: int, latest: int) -> None:
        super().__init__(f"changes after {since} were pruned: the oldest kept is {oldest} (the newest {latest})")
        self.since, self.oldest, self.latest = since, oldest, latest


def checked_changes(seq: int, rows: list[tuple]) -> list[tuple[int, str]]:
    """For implementations of `changes_since`: `rows` are (seq, name, oldest kept seq) read in one snapshot, with
    one row (None, None, oldest) when nothing came after `seq`; the changes, or ChangesPrunedError."""
    changes = [(s, n) for s, n, _ in rows if s is not None]
    oldest = rows[0][2] if rows else None
    if oldest is not None and oldest > seq + 1:
        raise ChangesPrunedError(seq, oldest, changes[-1][0] if changes else oldest)
    return changes


@dataclass(frozen=True)
class AdapterRecord:
    """One index row: what a name currently points at."""

    name: str
    version: int
    sha256: str
    bytes: int  # both stored files together
    rank: int  # the largest rank of any module
    targets: list[str]
    num_parameters: int
    task_type: str | None
    created_at: str  # ISO 8601, UTC, milliseconds
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. how a composed adapter was made

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class NewAdapter:
    """What a put writes into the index. `version` and `created_at` are normally assigned by the index;
    a migration passes them to keep an adapter's history."""

    name: str
    sha256: str
    bytes: int
    rank: int
    targets: list[str]
    num_parameters: int
    task_type: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    version: int | None = None
    created_at: str | None = None


@runtime_checkable
class AdapterIndex(Protocol):
    def get(self, name: str) -> AdapterRecord:
        """The current record; raises adapters.UnknownAdapterError if there is none."""

    def list(self, limit: int = 100, after: str | None = None) -> tuple[list[AdapterRecord], bool]:
        """One page in name order, names strictly after the cursor `after`; (records, has_more)."""

    def count(self) -> int: ...

    def put(self, new: NewAdapter, *, overwrite: bool) -> tuple[AdapterRecord, AdapterRecord | None]:
        """Atomically create the name (or, with overwrite, replace it): (new record, the replaced one or None).
        Raises service.storage.AdapterExistsError if the name exists and overwrite is False."""

    def delete(self, name: str) -> AdapterRecord:
        """Remove the name; returns the removed record; raises UnknownAdapterError if there is none."""

    def referenced(self) -> set[str]:
        """Every sha256 that some row points at."""

    def orphans(self, older_than_s: float) -> list[str]:
        """sha256s that lost their last row more than `older_than_s` seconds ago and have none now."""

    def forget_orphan(self, sha256: str) -> bool:
        """Drop the orphan note if the sha256 is still unreferenced (True: the blob may go now)."""

    def sequence(self) -> int:
        """The number of the latest change (0 for an empty, never-changed index)."""

    def changes_since(self, seq: int) -> list[tuple[int, str]]:
        """(seq, name) of every change after `seq`, oldest first. Raises ChangesPrunedError if the oldest kept
        change is past seq + 1, read in the same snapshot as the rows: some after `seq` may be gone. Numbers
        can have gaps (PostgreSQL spends one on a rolled-back insert), so this may also fire for a gap at the
        very start; the caller's answer, starting over, is correct either way."""

    def prune_changes(self, older_than_s: float) -> int:
        """Delete the change records older than `older_than_s` seconds, except the newest record of all (so
        `sequence()` stays where it is); returns how many went. What goes is always a prefix of the log."""

    def get_meta(self, key: str) -> str | None:
        """A store-wide fact (for example the identity of the base model the store belongs to)."""

    def set_meta_if_absent(self, key: str, value: str) -> str:
        """Set the fact unless it is set already; returns the value now in force."""

    def compare_and_set_meta(self, key: str, expected: str | None, value: str) -> bool:
        """Set the fact to `value` only if it is `expected` now (None: only if it is not set), atomically;
        True if it was set. A small updatable record that several processes share (e.g. the cluster's
        merge pins): read it, compute the next value, and try again when another writer came first."""

    def close(self) -> None: ...


@runtime_checkable
class BlobStore(Protocol):
    def put(self, sha256: str, files: Mapping[str, bytes]) -> bool:
        """Store the files under the digest unless they are there: True if written now, False if they existed.
        Durable and complete when it returns; a crash midway leaves no partial blob visible to `get`."""

    def get(self, sha256: str, filename: str) -> bytes:
        """One file's bytes; raises FileNotFoundError if the blob (or that file) is absent."""

    def exists(self, sha256: str) -> bool: ...

    def delete(self, sha256: str) -> None:
        """Idempotent: deleting an absent blob is not an error."""

    def list(self) -> Iterator[tuple[str, float]]:
        """(sha256, last-modified time as Unix seconds) of every stored blob."""

    def collect_temporary(self, older_than_s: float) -> int:
        """Remove leftovers of interrupted writes older than `older_than_s` (a local temp dir, say); returns
        how many. Backends with atomic writes return 0."""

    def close(self) -> None: ...
