"""`SqliteIndex`: the AdapterIndex of the embedded store, one SQLite file (WAL, synchronous=FULL).

    adapters  name -> version, sha256, bytes, rank, targets, ...   (today's table, unchanged)
    versions  name -> last version ever given                      (so versions never repeat after a delete)
    changes   seq -> name, at                                      (every put and delete, for changes_since;
                                                                    pruned by prune_changes, the newest kept)
    orphans   sha256 -> since                                      (lost its last row at `since`, Unix seconds)
    meta      key -> value                                         (store-wide facts: base identity, cluster pins)

An index.sqlite3 written by earlier versions is migrated in place: the new tables are created if absent,
nothing else changes. Writes take SQLite's write lock first (BEGIN IMMEDIATE), so two processes sharing the
file serialize their puts; one connection serves every thread of a process, under a lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from adapters import UnknownAdapterError
from service.storage.errors import AdapterExistsError
from service.storage.interfaces import AdapterRecord, NewAdapter, checked_changes

__all__ = ["SqliteIndex"]

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
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS orphans (sha256 TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_COLUMNS = "name, version, sha256, bytes, rank, targets, num_parameters, task_type, created_at, meta"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SqliteIndex:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self._lock = threading.RLock()  # one connection, shared by the handlers' threads
        # timeout: how long a write waits for another process's transaction before "database is locked".
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ reads
    def get(self, name: str) -> AdapterRecord:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name)
        return _record(row)

    def list(self, limit: int = 100, after: str | None = None) -> tuple[list[AdapterRecord], bool]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name > ? ORDER BY name LIMIT ?",
                                    (after or "", limit + 1)).fetchall()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM adapters").fetchone()[0]

    def referenced(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT sha256 FROM adapters")}

    def orphans(self, older_than_s: float) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT sha256 FROM orphans WHERE since <= ? AND NOT EXISTS "
                                    "(SELECT 1 FROM adapters WHERE adapters.sha256 = orphans.sha256) ORDER BY since",
                                    (time.time() - older_than_s,)).fetchall()
        return [r[0] for r in rows]

    def sequence(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def changes_since(self, seq: int) -> list[tuple[int, str]]:
        # One statement, so the oldest kept seq and the rows come from one snapshot (another process may prune).
        with self._lock:
            rows = self._db.execute("SELECT c.seq, c.name, k.oldest FROM (SELECT MIN(seq) AS oldest FROM changes) k "
                                    "LEFT JOIN changes c ON c.seq > ? ORDER BY c.seq", (seq,)).fetchall()
        return checked_changes(seq, rows)

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ writes
    def put(self, new: NewAdapter, *, overwrite: bool) -> tuple[AdapterRecord, AdapterRecord | None]:
        with self._lock, self._transaction():
            row = self._db.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = ?", (new.name,)).fetchone()
            old = None if row is None else _record(row)
            if old is not None and not overwrite:
                raise AdapterExistsError(f"adapter {new.name!r} already exists (use ?overwrite=true for a new "
                                         "version)", key=new.name)
            last = self._db.execute("SELECT last FROM versions WHERE name = ?", (new.name,)).fetchone()
            version = new.version if new.version is not None else (last[0] if last else 0) + 1
            self._db.execute("INSERT INTO versions (name, last) VALUES (?, ?) ON CONFLICT(name) "
                             "DO UPDATE SET last = MAX(last, excluded.last)", (new.name, version))
            values = (new.name, version, new.sha256, new.bytes, new.rank, json.dumps(new.targets), new.num_parameters,
                      new.task_type, new.created_at or _now_iso(), json.dumps(new.meta))
            self._db.execute(f"INSERT OR REPLACE INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             values)
            self._db.execute("DELETE FROM orphans WHERE sha256 = ?", (new.sha256,))  # referenced again
            if old is not None and old.sha256 != new.sha256:
                self._note_if_orphan(old.sha256)
            self._changed(new.name)
        return _record(values), old

    def delete(self, name: str) -> AdapterRecord:
        with self._lock, self._transaction():
            record = self.get(name)
            self._db.execute("DELETE FROM adapters WHERE name = ?", (name,))
            self._note_if_orphan(record.sha256)
            self._changed(name)
        return record

    def forget_orphan(self, sha256: str) -> bool:
        with self._lock, self._transaction():
            if self._is_referenced(sha256):
                self._db.execute("DELETE FROM orphans WHERE sha256 = ?", (sha256,))
                return False
            return self._db.execute("DELETE FROM orphans WHERE sha256 = ?", (sha256,)).rowcount > 0

    def set_meta_if_absent(self, key: str, value: str) -> str:
        with self._lock, self._transaction():
            self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
            return self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    def compare_and_set_meta(self, key: str, expected: str | None, value: str) -> bool:
        with self._lock, self._transaction():  # BEGIN IMMEDIATE: no other process writes between read and write
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if (row[0] if row else None) != expected:
                return False
            self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))
            return True

    def prune_changes(self, older_than_s: float) -> int:
        # ISO 8601 text in UTC with fixed milliseconds (_now_iso) sorts as time does. Everything up to the newest
        # old row goes, so what is left is a suffix of the log even if the clock stepped back meanwhile.
        cutoff = (datetime.now(UTC) - timedelta(seconds=older_than_s)).isoformat(timespec="milliseconds")
        with self._lock, self._transaction():
            return self._db.execute("DELETE FROM changes WHERE seq < (SELECT MAX(seq) FROM changes) "
                                    "AND seq <= (SELECT MAX(seq) FROM changes WHERE at <= ?)", (cutoff,)).rowcount

    # ------------------------------------------------------------------ internals
    def _is_referenced(self, sha256: str) -> bool:
        return self._db.execute("SELECT 1 FROM adapters WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None

    def _note_if_orphan(self, sha256: str) -> None:
        if not self._is_referenced(sha256):
            self._db.execute("INSERT OR IGNORE INTO orphans (sha256, since) VALUES (?, ?)", (sha256, time.time()))

    def _changed(self, name: str) -> None:
        self._db.execute("INSERT INTO changes (name, at) VALUES (?, ?)", (name, _now_iso()))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")  # the write lock now, so a read-then-write cannot race another writer
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def _record(row: tuple) -> AdapterRecord:
    name, version, sha, nbytes, rank, targets, params, task_type, created_at, meta = row
    return AdapterRecord(name, version, sha, nbytes, rank, json.loads(targets), params, task_type, created_at,
                         json.loads(meta))
