"""AdapterIndex on PostgreSQL, so that several servers share one store's names.

    PostgresIndex("postgresql://user@db:5432/lora")        # schema migrated on first use (postgres_schema.py)

Each put/delete is one transaction that also inserts a `changes` row and sends
`NOTIFY lora_adapters, '<seq>:<name>'`; the notification is delivered at commit. Changes are numbered
under a transaction-scoped advisory lock taken just before the `changes` insert, so sequence numbers
commit in order: a reader that sees seq N has seen every change before it (a plain BIGSERIAL could
commit 6 before 5, and a follower at 6 would never see 5).

After its commit, a write waits (at most `ack_timeout_s`) until every name cache with a live lease
(name_cache.py) has acknowledged its change: when put/delete returns, no server answers from a stale
cache entry. Connection failures, however they surface, raise StorageUnavailableError("index", ...).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any, TypeVar

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from adapters import UnknownAdapterError
from service.storage.errors import AdapterExistsError
from service.storage.interfaces import AdapterRecord, NewAdapter, StorageUnavailableError, checked_changes
from service.storage.postgres_schema import CHANGES_LOCK, CHANNEL, migrate

__all__ = ["PostgresIndex", "read_changes"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_COLUMNS = "name, version, sha256, bytes, rank, targets, num_parameters, task_type, created_at, meta"


class PostgresIndex:
    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 8, timeout_s: float = 5.0,
                 ack_timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.ack_timeout_s = ack_timeout_s
        # autocommit: a read is one round trip (no BEGIN/COMMIT); writes open explicit transactions.
        # reconnect_timeout = timeout_s: after an outage the pool gives up its backoff quickly, and the next
        # request starts a fresh connection attempt instead of waiting out a long backoff.
        self._pool = ConnectionPool(url, min_size=min_size, max_size=max_size, timeout=timeout_s, open=False,
                                    reconnect_timeout=max(timeout_s, 1.0), name="lora-index",
                                    kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s))})
        self._pool.open(wait=False)
        self._migrated = False
        self._migrate_lock = threading.Lock()
        # While PostgreSQL is unreachable, a call waits up to timeout_s for a connection. Without a breaker every
        # request would, and the server would stall: after a failure, calls fail at once for retry_s, and then
        # one call at a time probes (the others keep failing at once while it waits).
        self.retry_s = 1.0
        self._down_until = 0.0  # monotonic

    # ------------------------------------------------------------------ plumbing
    def _run(self, fn: Callable[[psycopg.Connection], T], *, write: bool = False) -> T:
        """fn on a pooled connection, migrations first. A connection that an outage broke while it sat idle in the
        pool fails on its first use; that is retried once on a fresh one. Reads retry whenever the connection broke;
        writes ping first and retry only a failed ping, since nothing of theirs was sent then (after it, a lost
        connection may or may not have committed, and a blind retry could write twice)."""
        now = time.monotonic()
        if now < self._down_until:
            raise StorageUnavailableError("index", f"PostgreSQL unreachable ({_where(self.url)}); retried every "
                                                   f"{self.retry_s:g} s")
        if self._down_until:  # the first call after the pause probes; the rest fail at once meanwhile
            self._down_until = now + self.timeout_s + self.retry_s
        try:
            result = self._attempt(fn, write)
        except StorageUnavailableError:
            self._down_until = time.monotonic() + self.retry_s
            raise
        except BaseException:  # PostgreSQL answered (a 404, a 409...)
            self._down_until = 0.0
            raise
        self._down_until = 0.0
        return result

    def _attempt(self, fn: Callable[[psycopg.Connection], T], write: bool) -> T:
        for attempt in (0, 1):
            try:
                with self._pool.connection() as conn:
                    try:
                        if not self._migrated:
                            self._migrate(conn)
                        if write:
                            ConnectionPool.check_connection(conn)
                        else:
                            return fn(conn)
                    except psycopg.OperationalError:
                        if attempt == 0 and conn.broken:
                            raise _Stale() from None
                        raise
                    return fn(conn)
            except _Stale:
                self._pool.check()  # drop every connection the same outage broke
            except PoolTimeout as exc:
                raise StorageUnavailableError("index", f"PostgreSQL unreachable: no connection in "
                                                       f"{self.timeout_s:g} s ({_where(self.url)})") from exc
            except psycopg.OperationalError as exc:
                raise StorageUnavailableError("index", f"PostgreSQL unreachable ({_where(self.url)}): "
                                                       f"{str(exc).strip()[:200]}") from exc
        raise StorageUnavailableError("index", f"PostgreSQL unreachable ({_where(self.url)})")

    def _migrate(self, conn: psycopg.Connection) -> None:
        with self._migrate_lock:
            if not self._migrated:
                applied = migrate(conn)
                if applied:
                    log.info("index: applied %d schema migration(s) to %s", applied, _where(self.url))
                self._migrated = True

    def migrate(self) -> None:
        """Apply pending migrations now (they otherwise run on first use)."""
        self._run(lambda conn: None)

    # ------------------------------------------------------------------ reads
    def get(self, name: str) -> AdapterRecord:
        row = self._run(lambda c: c.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = %s", (name,)).fetchone())
        if row is None:
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name)
        return _record(row)

    def list(self, limit: int = 100, after: str | None = None) -> tuple[list[AdapterRecord], bool]:
        rows = self._run(lambda c: c.execute(
            f"SELECT {_COLUMNS} FROM adapters WHERE name > %s ORDER BY name LIMIT %s",
            (after or "", limit + 1)).fetchall())
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def count(self) -> int:
        return self._run(lambda c: c.execute("SELECT count(*) FROM adapters").fetchone()[0])

    def referenced(self) -> set[str]:
        return {r[0] for r in self._run(lambda c: c.execute("SELECT DISTINCT sha256 FROM adapters").fetchall())}

    def orphans(self, older_than_s: float) -> list[str]:
        rows = self._run(lambda c: c.execute(
            "SELECT sha256 FROM orphans o WHERE since <= now() - make_interval(secs => %s) "
            "AND NOT EXISTS (SELECT 1 FROM adapters a WHERE a.sha256 = o.sha256) ORDER BY since, sha256",
            (float(older_than_s),)).fetchall())
        return [r[0] for r in rows]

    def forget_orphan(self, sha256: str) -> bool:
        # One statement: the note goes only if no row points at the blob at that moment; a concurrent put of the
        # same bytes deletes the note itself (row lock on it), so exactly one of them removes it.
        row = self._run(lambda c: c.execute(
            "DELETE FROM orphans o WHERE sha256 = %s AND NOT EXISTS "
            "(SELECT 1 FROM adapters a WHERE a.sha256 = o.sha256) RETURNING 1", (sha256,)).fetchone(), write=True)
        return row is not None

    def sequence(self) -> int:
        return self._run(lambda c: c.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0])

    def changes_since(self, seq: int) -> list[tuple[int, str]]:
        return self._run(lambda c: read_changes(c, seq))

    def prune_changes(self, older_than_s: float) -> int:
        # Everything up to the newest old row goes, never the newest of all: what is left is a suffix of the
        # log (changes_since relies on it), and max(seq), the sequence, stays put.
        return self._run(lambda c: c.execute(
            "DELETE FROM changes WHERE seq < (SELECT max(seq) FROM changes) AND seq <= (SELECT max(seq) FROM changes "
            "WHERE at <= clock_timestamp() - make_interval(secs => %s))", (float(older_than_s),)).rowcount, write=True)

    def get_meta(self, key: str) -> str | None:
        row = self._run(lambda c: c.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone())
        return None if row is None else row[0]

    def set_meta_if_absent(self, key: str, value: str) -> str:
        def run(c: psycopg.Connection) -> str:
            c.execute("INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, value))
            return c.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()[0]  # a new snapshot

        return self._run(run, write=True)

    def compare_and_set_meta(self, key: str, expected: str | None, value: str) -> bool:
        if expected is None:  # one statement each: the row lock (or the key's uniqueness) settles a race
            sql, params = "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING RETURNING 1", \
                (key, value)
        else:
            sql, params = "UPDATE meta SET value = %s WHERE key = %s AND value = %s RETURNING 1", (value, key, expected)
        return self._run(lambda c: c.execute(sql, params).fetchone(), write=True) is not None

    # ------------------------------------------------------------------ writes
    def put(self, new: NewAdapter, *, overwrite: bool) -> tuple[AdapterRecord, AdapterRecord | None]:
        record, old, seq = self._run(lambda c: self._put(c, new, overwrite), write=True)
        self._await_caches(seq)
        return record, old

    def _put(self, c: psycopg.Connection, new: NewAdapter, overwrite: bool) -> tuple[AdapterRecord, Any, int]:
        with c.transaction():
            # The versions row is the per-name lock: a concurrent put of the same name waits here until this
            # transaction ends, then sees its row (READ COMMITTED: each statement takes a fresh snapshot).
            last, now = c.execute(
                "INSERT INTO versions (name, last) VALUES (%s, 0) ON CONFLICT (name) DO UPDATE SET last = "
                "versions.last RETURNING last, clock_timestamp()", (new.name,)).fetchone()
            row = c.execute(f"SELECT {_COLUMNS} FROM adapters WHERE name = %s", (new.name,)).fetchone()
            old = None if row is None else _record(row)
            if old is not None and not overwrite:
                raise AdapterExistsError(f"adapter {new.name!r} already exists (use ?overwrite=true for a new "
                                         "version)", key=new.name)
            version = last + 1 if new.version is None else new.version
            if version <= last:
                raise ValueError(f"version {version} of {new.name!r} would reuse a version (last was {last})")
            created_at = new.created_at or now.astimezone(UTC).isoformat(timespec="milliseconds")
            values = (new.name, version, new.sha256, new.bytes, new.rank, Jsonb(list(new.targets)),
                      new.num_parameters, new.task_type, created_at, Jsonb(dict(new.meta)))
            c.execute("UPDATE versions SET last = %s WHERE name = %s", (version, new.name))
            c.execute(f"INSERT INTO adapters ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                      "ON CONFLICT (name) DO UPDATE SET " +
                      ", ".join(f"{col} = excluded.{col}" for col in _COLUMNS.split(", ")[1:]), values)
            c.execute("DELETE FROM orphans WHERE sha256 = %s", (new.sha256,))
            if old is not None and old.sha256 != new.sha256:
                self._note_orphan(c, old.sha256)
            seq = self._log_change(c, new.name, "put")
        record = AdapterRecord(new.name, version, new.sha256, new.bytes, new.rank, list(new.targets),
                               new.num_parameters, new.task_type, created_at, dict(new.meta))
        return record, old, seq

    def delete(self, name: str) -> AdapterRecord:
        def run(c: psycopg.Connection) -> tuple[AdapterRecord, int]:
            with c.transaction():
                row = c.execute(f"DELETE FROM adapters WHERE name = %s RETURNING {_COLUMNS}", (name,)).fetchone()
                if row is None:
                    raise UnknownAdapterError(f"adapter {name!r} not found", key=name)
                record = _record(row)
                self._note_orphan(c, record.sha256)
                return record, self._log_change(c, name, "delete")

        record, seq = self._run(run, write=True)
        self._await_caches(seq)
        return record

    @staticmethod
    def _note_orphan(c: psycopg.Connection, sha256: str) -> None:
        # since = now: a note left from an earlier orphaning restarts its grace, never shortens it.
        c.execute("INSERT INTO orphans (sha256, since) SELECT %s, clock_timestamp() WHERE NOT EXISTS "
                  "(SELECT 1 FROM adapters WHERE sha256 = %s) ON CONFLICT (sha256) DO UPDATE SET since = "
                  "excluded.since", (sha256, sha256))

    @staticmethod
    def _log_change(c: psycopg.Connection, name: str, op: str) -> int:
        # Held to commit: changes are numbered and committed in the same order (see the module docstring).
        c.execute("SELECT pg_advisory_xact_lock(%s)", (CHANGES_LOCK,))
        seq = c.execute("INSERT INTO changes (name, op) VALUES (%s, %s) RETURNING seq", (name, op)).fetchone()[0]
        c.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{seq}:{name}"))
        return seq

    def _await_caches(self, seq: int) -> None:
        """Wait until every name cache holding a live lease has acknowledged change `seq` (or its lease ran out)."""
        deadline, pause = time.monotonic() + self.ack_timeout_s, 0.0005
        while True:
            try:
                waiting = self._run(lambda c: c.execute(
                    "SELECT count(*) FROM listeners WHERE lease_until > clock_timestamp() AND acked_seq < %s",
                    (seq,)).fetchone()[0])
            except StorageUnavailableError as exc:  # the write is committed; caches cut off from it lose their lease
                log.warning("index: could not wait for name caches to acknowledge change %d: %s", seq, exc)
                return
            if not waiting:
                return
            if time.monotonic() >= deadline:
                log.warning("index: %d name cache(s) did not acknowledge change %d in %g s", waiting, seq,
                            self.ack_timeout_s)
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def close(self) -> None:
        self._pool.close()


class _Stale(Exception):
    """A pooled connection was found broken before anything was sent on it."""


def _record(row: tuple) -> AdapterRecord:
    name, version, sha, nbytes, rank, targets, params, task_type, created_at, meta = row
    return AdapterRecord(name, version, sha, nbytes, rank, list(targets), params, task_type, created_at, dict(meta))


def read_changes(conn: psycopg.Connection, seq: int) -> list[tuple[int, str]]:
    """changes_since on a given connection (the name cache's listener reads on its own). One statement, so the
    oldest kept seq and the rows come from one snapshot while another process may be pruning."""
    rows = conn.execute("SELECT c.seq, c.name, k.oldest FROM (SELECT min(seq) AS oldest FROM changes) k "
                        "LEFT JOIN changes c ON c.seq > %s ORDER BY c.seq", (seq,)).fetchall()
    return checked_changes(seq, rows)


def _where(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
