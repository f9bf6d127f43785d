"""The adapter store: PEFT files on local disk, content-addressed, indexed in SQLite, crash-safe.

    <root>/
      index.sqlite3                  name -> version, sha256, bytes, rank, targets, ...   (WAL, synchronous=FULL)
      blobs/<sha[:2]>/<sha256>/      adapter_config.json + adapter_model.safetensors       (immutable)
      tmp/                           uploads being written; emptied whenever the store opens

A put writes both files under tmp/, fsyncs them, renames the directory into blobs/ (atomic) and only
then commits the index row. A crash at any point, kill -9 included, leaves the old state or the new
one: a stray tmp/ entry or an unreferenced blob at worst, and both are removed on the next open. A
row never points at a partial adapter.

The files are stored in canonical form (`adapters.to_peft_bytes`: the config rewritten as sorted JSON with
only the fields PEFT and this service use, the tensors as safetensors with any label names in its
`__metadata__`), and the blob is named by their sha256, so the same adapter uploaded twice (as two PEFT
files or as one single file) is stored once, and one relabelled is a new blob. A blob is removed when its
last row goes. Names are never used as paths.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapters import AdapterError, LoraWeights, UnknownAdapterError, to_peft_bytes, weights_from_bytes
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["AdapterStore", "AdapterRecord", "AdapterExistsError", "InvalidAdapterNameError", "NAME_PATTERN",
           "FILENAMES", "check_name", "adapter_digest"]

log = logging.getLogger(__name__)

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
FILENAMES = (CONFIG_NAME, WEIGHTS_NAME)
RESERVED_NAMES = frozenset({"base"})
_NAME = re.compile(NAME_PATTERN)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS adapters (
    name           TEXT PRIMARY KEY,
    version        INTEGER NOT NULL,
    sha256         TEXT NOT NULL,
    bytes          INTEGER NOT NULL,  -- both stored files together
    rank           INTEGER NOT NULL,  -- the largest rank of any module
    targets        TEXT NOT NULL,     -- JSON list of module paths
    num_parameters INTEGER NOT NULL,
    task_type      TEXT,
    created_at     TEXT NOT NULL,     -- ISO 8601, UTC
    meta           TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS adapters_by_sha256 ON adapters(sha256);
CREATE TABLE IF NOT EXISTS versions (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""
_COLUMNS = "name, version, sha256, bytes, rank, targets, num_parameters, task_type, created_at, meta"


class AdapterExistsError(AdapterError):
    """The name is taken and overwrite was not asked for."""


class InvalidAdapterNameError(AdapterError):
    """The name does not match NAME_PATTERN."""


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    version: int
    sha256: str
    bytes: int
    rank: int
    targets: list[str]
    num_parameters: int
    task_type: str | None
    created_at: str
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. how a composed adapter was made

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidAdapterNameError(f"invalid adapter name {name!r}: it must match {NAME_PATTERN}", field="name")
    if name in RESERVED_NAMES:
        raise InvalidAdapterNameError(f"invalid adapter name {name!r}: it is reserved for the bare base model",
                                      field="name")
    return name


def adapter_digest(config_bytes: bytes, model_bytes: bytes) -> str:
    """sha256 over the canonical config (length-prefixed) followed by the canonical weights."""
    h = hashlib.sha256(len(config_bytes).to_bytes(8, "little"))
    h.update(config_bytes)
    h.update(model_bytes)
    return h.hexdigest()


class AdapterStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.blobs, self.tmp = self.root / "blobs", self.root / "tmp"
        for d in (self.root, self.blobs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # one connection, shared by the handlers' threads
        self._db = sqlite3.connect(self.root / "index.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._recover()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reads
    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def exists(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM adapters WHERE name = ?", (name,)).fetchone() is not None

    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name)
        return _record(row)

    def list(self, limit: int = 100, after: str | None = None) -> tuple[list[AdapterRecord], bool]:
        """One page in name order, starting after the cursor `after`; (records, has_more)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name > ? ORDER BY name LIMIT ?",
                                    (after or "", limit + 1)).fetchall()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def read_file(self, name: str, filename: str) -> bytes:
        if filename not in FILENAMES:
            raise UnknownAdapterError(f"adapter {name!r} has no file {filename!r}; the files are {list(FILENAMES)}",
                                      key=filename)
        record = self.get(name)
        try:
            return (self._blob_dir(record.sha256) / filename).read_bytes()
        except FileNotFoundError as exc:  # deleted between the lookup and the read
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name) from exc

    def load_weights(self, name: str) -> LoraWeights:
        """The stored adapter as tensors (not yet checked against a base: the engine validates)."""
        record = self.get(name)
        blob = self._blob_dir(record.sha256)
        try:
            config_bytes, model_bytes = (blob / CONFIG_NAME).read_bytes(), (blob / WEIGHTS_NAME).read_bytes()
        except FileNotFoundError as exc:
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name) from exc
        return weights_from_bytes(config_bytes, model_bytes)

    # ------------------------------------------------------------------ writes
    def put(self, name: str, weights: LoraWeights, *, overwrite: bool = False,
            meta: dict[str, Any] | None = None) -> AdapterRecord:
        """Store `weights` under `name` (a new version if it exists and overwrite is set)."""
        check_name(name)
        if not overwrite and self.exists(name):  # fail fast; checked again under the lock
            raise AdapterExistsError(f"adapter {name!r} already exists (use ?overwrite=true for a new version)",
                                     key=name)
        config_bytes, model_bytes = to_peft_bytes(weights)
        sha = adapter_digest(config_bytes, model_bytes)
        staging: Path | None = self._stage(config_bytes, model_bytes)
        try:
            with self._lock:
                old = self._row(name)
                if old is not None and not overwrite:
                    raise AdapterExistsError(f"adapter {name!r} already exists (use ?overwrite=true for a new "
                                             "version)", key=name)
                blob = self._blob_dir(sha)
                if not blob.exists():
                    created = not blob.parent.exists()
                    blob.parent.mkdir(exist_ok=True)
                    os.replace(staging, blob)  # the commit point of the files
                    staging = None
                    _fsync_dir(blob.parent)
                    _fsync_dir(self.tmp)
                    if created:
                        _fsync_dir(self.blobs)
                try:
                    record = self._insert(name, sha, len(config_bytes) + len(model_bytes), weights, meta or {})
                except BaseException:
                    self._collect(sha)  # the files just moved in (if no other row shares them) go too
                    raise
                if old is not None and old.sha256 != sha:
                    self._collect(old.sha256)
                return record
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)

    def delete(self, name: str) -> AdapterRecord:
        with self._lock:
            record = self.get(name)
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            self._collect(record.sha256)
            return record

    # ------------------------------------------------------------------ internals
    def _blob_dir(self, sha: str) -> Path:
        return self.blobs / sha[:2] / sha

    def _row(self, name: str) -> AdapterRecord | None:
        try:
            return self.get(name)
        except UnknownAdapterError:
            return None

    def _stage(self, config_bytes: bytes, model_bytes: bytes) -> Path:
        """Both files in a fresh tmp/ directory, fsync'd; the caller renames it into place."""
        staging = self.tmp / uuid.uuid4().hex
        staging.mkdir()
        try:
            for filename, data in ((CONFIG_NAME, config_bytes), (WEIGHTS_NAME, model_bytes)):
                with open(staging / filename, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_dir(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    def _insert(self, name: str, sha: str, nbytes: int, weights: LoraWeights, meta: dict[str, Any]) -> AdapterRecord:
        created_at = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self._transaction():
            last = self._db.execute("SELECT last FROM versions WHERE name = ?", (name,)).fetchone()
            version = (last[0] if last else 0) + 1  # versions never repeat, even after a delete
            self._db.execute("INSERT INTO versions (name, last) VALUES (?, ?) "
                             "ON CONFLICT(name) DO UPDATE SET last = excluded.last", (name, version))
            values = (name, version, sha, nbytes, weights.max_rank(), json.dumps(weights.targets()),
                      weights.num_parameters(), weights.config.task_type, created_at, json.dumps(meta))
            self._db.execute(f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             values)
        return _record(values)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _collect(self, sha: str) -> None:
        """Remove a blob that no row references any more (caller holds the lock)."""
        if self._db.execute("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha,)).fetchone() is None:
            blob = self._blob_dir(sha)
            shutil.rmtree(blob, ignore_errors=True)
            with contextlib.suppress(OSError):  # the shard directory, once empty
                blob.parent.rmdir()

    def _recover(self) -> None:
        """Make the store consistent after a crash: no tmp files, no unreferenced blobs, no dangling rows."""
        for entry in self.tmp.iterdir():
            log.warning("store: removing %s, left by an interrupted upload", entry.name)
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        referenced = {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM adapters")}
        for shard in self.blobs.iterdir():
            for blob in shard.iterdir() if shard.is_dir() else ():
                if blob.name not in referenced:
                    log.warning("store: removing unreferenced blob %s", blob.name)
                    shutil.rmtree(blob, ignore_errors=True)
        for sha in referenced:
            if not all((self._blob_dir(sha) / f).is_file() for f in FILENAMES):
                log.error("store: blob %s is missing; dropping the adapters that pointed at it", sha)
                self._db.execute("DELETE FROM adapters WHERE sha256 = ?", (sha,))


def _record(row: tuple) -> AdapterRecord:
    name, version, sha, nbytes, rank, targets, params, task_type, created_at, meta = row
    return AdapterRecord(name, version, sha, nbytes, rank, json.loads(targets), params, task_type, created_at,
                         json.loads(meta))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
