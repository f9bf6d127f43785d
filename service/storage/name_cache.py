"""A name cache in front of PostgresIndex: `get` from memory, kept exact by LISTEN/NOTIFY and leases.

    CachedIndex(PostgresIndex(url), ttl_s=5.0)        # every other method goes straight to the index

Every request resolves its adapter name, and a PostgreSQL round trip per request is the cost this
removes. A TTL alone would serve a name's old version for up to the TTL after another server
overwrote it; NOTIFY alone is asynchronous, so a client that uploads on server A and then asks server
B could still beat the notification to B. So the cache answers only under a lease:

  * A listener thread (its own connection) LISTENs, invalidates the names it is told about, and then
    acknowledges: `listeners.acked_seq` = the last change applied, `lease_until` = now + lease_s.
  * A write (PostgresIndex.put/delete, on any server) returns only after every listener whose lease is
    live has acknowledged its change, or that lease has run out (a frozen server delays writes by at
    most lease_s).
  * The cache answers only while its own lease is live by its clock (counted from before the renewal
    was sent, less 10%), and no entry is older than ttl_s. Without a live lease (listener down,
    reconnecting, starved) `get` goes to the index; if the index is unreachable too, an entry younger
    than ttl_s is served rather than failing the request (the only way an answer can be stale).

After a reconnection, changes missed while disconnected are read with `changes_since` (NOTIFY does not
replay) before the lease is renewed. If some of them were pruned meanwhile (`lora-store gc` prunes the log
past its grace period), the names they touched are unknown, so the whole cache is dropped instead. A fill
that raced with an invalidation is not stored.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

import psycopg

from adapters import UnknownAdapterError
from service.storage.interfaces import AdapterRecord, ChangesPrunedError, NewAdapter, StorageUnavailableError
from service.storage.postgres_index import PostgresIndex, read_changes
from service.storage.postgres_schema import CHANNEL

__all__ = ["CachedIndex"]

log = logging.getLogger(__name__)
_POLL_S = 0.25  # longest the listener sleeps between checks of its stop flag


class CachedIndex:
    def __init__(self, index: PostgresIndex, ttl_s: float = 5.0, *, lease_s: float = 3.0,
                 max_entries: int = 10_000) -> None:
        self.index, self.ttl_s, self.lease_s, self.max_entries = index, ttl_s, lease_s, max_entries
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.stats = {"hits": 0, "misses": 0, "stale_served": 0, "reconnects": 0, "resyncs": 0}
        self._entries: OrderedDict[str, tuple[float, AdapterRecord | None]] = OrderedDict()  # None: no such name
        self._lock = threading.Lock()
        self._generation = 0  # bumped by every invalidation: a fill that saw an older one is not stored
        self._trusted_until = 0.0  # monotonic; the cache answers only before this
        self._applied = -1  # last change seq applied to the cache; -1 before the first connection
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="lora-name-cache", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ reads
    @property
    def trusted(self) -> bool:
        """Whether the cache may answer now (live listener, live lease)."""
        return time.monotonic() < self._trusted_until

    def get(self, name: str) -> AdapterRecord:
        started = time.monotonic()
        with self._lock:
            trusted, generation = started < self._trusted_until, self._generation
            entry = self._entries.get(name)
            if trusted and entry is not None and started - entry[0] < self.ttl_s:
                self.stats["hits"] += 1
                return _answer(name, entry[1])
            self.stats["misses"] += 1
        try:
            try:
                record: AdapterRecord | None = self.index.get(name)
            except UnknownAdapterError:
                record = None
        except StorageUnavailableError:
            if entry is not None and time.monotonic() - entry[0] < self.ttl_s:
                self.stats["stale_served"] += 1
                return _answer(name, entry[1])
            raise
        with self._lock:
            if trusted and self._generation == generation and time.monotonic() < self._trusted_until:
                self._entries[name] = (started, record)  # aged from before the read: never younger than it is
                self._entries.move_to_end(name)
                while len(self._entries) > self.max_entries:
                    self._entries.popitem(last=False)
        return _answer(name, record)

    def list(self, limit: int = 100, after: str | None = None) -> tuple[list[AdapterRecord], bool]:
        return self.index.list(limit, after)

    def count(self) -> int:
        return self.index.count()

    def referenced(self) -> set[str]:
        return self.index.referenced()

    def orphans(self, older_than_s: float) -> list[str]:
        return self.index.orphans(older_than_s)

    def forget_orphan(self, sha256: str) -> bool:
        return self.index.forget_orphan(sha256)

    def sequence(self) -> int:
        return self.index.sequence()

    def changes_since(self, seq: int) -> list[tuple[int, str]]:
        return self.index.changes_since(seq)

    def prune_changes(self, older_than_s: float) -> int:
        return self.index.prune_changes(older_than_s)

    def get_meta(self, key: str) -> str | None:
        return self.index.get_meta(key)

    def set_meta_if_absent(self, key: str, value: str) -> str:
        return self.index.set_meta_if_absent(key, value)

    def compare_and_set_meta(self, key: str, expected: str | None, value: str) -> bool:
        return self.index.compare_and_set_meta(key, expected, value)

    # ------------------------------------------------------------------ writes
    def put(self, new: NewAdapter, *, overwrite: bool) -> tuple[AdapterRecord, AdapterRecord | None]:
        try:
            return self.index.put(new, overwrite=overwrite)
        finally:
            self._invalidate([new.name])  # our own listener did it already, unless it is down

    def delete(self, name: str) -> AdapterRecord:
        try:
            return self.index.delete(name)
        finally:
            self._invalidate([name])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.index.close()

    # ------------------------------------------------------------------ the listener
    def _invalidate(self, names: list[str] | None, seq: int | None = None) -> None:
        """Drop these names (None: everything); record `seq` as applied."""
        with self._lock:
            self._generation += 1
            if names is None:
                self._entries.clear()
            else:
                for name in names:
                    self._entries.pop(name, None)
            if seq is not None:
                self._applied = max(self._applied, seq)

    def _distrust(self) -> None:
        with self._lock:
            self._trusted_until = 0.0
            self._generation += 1

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.index.url, autocommit=True, connect_timeout=max(1, round(self.index.timeout_s)),
                               application_name="lora-name-cache")

    def _listen(self) -> None:
        backoff, down_since = 0.05, None
        while not self._stop.is_set():
            try:
                self.index.migrate()  # the listeners table
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._catch_up(conn)
                    self._renew(conn)
                    if down_since is not None:
                        log.info("name cache: listener back after %.1f s", time.monotonic() - down_since)
                        self.stats["reconnects"] += 1
                    backoff, down_since = 0.05, None
                    self._serve(conn)
                    conn.execute("DELETE FROM listeners WHERE id = %s", (self.id,))
            except (psycopg.Error, OSError, StorageUnavailableError) as exc:
                self._distrust()
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("name cache: listener down (%s); answering from the index until it is back",
                                str(exc).strip()[:200])
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        self._distrust()

    def _catch_up(self, conn: psycopg.Connection) -> None:
        if self._applied < 0:  # first connection: nothing cached yet, start from the present
            seq = conn.execute("SELECT coalesce(max(seq), 0) FROM changes").fetchone()[0]
            self._invalidate(None, seq)
            return
        try:
            rows = read_changes(conn, self._applied)
        except ChangesPrunedError as exc:  # which names changed is lost with the pruned rows: drop them all
            log.warning("name cache: %s; dropping every entry", exc)
            self.stats["resyncs"] += 1
            self._invalidate(None, exc.latest)
            return
        if rows:
            self._invalidate([name for _, name in rows], rows[-1][0])

    def _serve(self, conn: psycopg.Connection) -> None:
        next_renew = time.monotonic() + self.lease_s / 3
        while not self._stop.is_set():
            wait = max(0.0, min(next_renew - time.monotonic(), _POLL_S))
            names, seq, garbled = [], None, False
            for n in conn.notifies(timeout=wait, stop_after=1):  # back as soon as one arrives
                head, _, name = n.payload.partition(":")
                if head.isdigit() and name:
                    names.append(name)
                    seq = int(head)
                else:
                    garbled = True
            if garbled:
                self._invalidate(None)
            if names:
                self._invalidate(names, seq)
            if names or garbled or time.monotonic() >= next_renew:
                self._renew(conn)
                next_renew = time.monotonic() + self.lease_s / 3

    def _renew(self, conn: psycopg.Connection) -> None:
        """Acknowledge what was applied and extend the lease; trust the cache until the lease's end by our clock."""
        sent = time.monotonic()
        with self._lock:
            applied = self._applied
        conn.execute(
            "INSERT INTO listeners (id, acked_seq, lease_until, host) VALUES "
            "(%s, %s, clock_timestamp() + make_interval(secs => %s), %s) ON CONFLICT (id) DO UPDATE SET "
            "acked_seq = excluded.acked_seq, lease_until = excluded.lease_until",
            (self.id, applied, float(self.lease_s), socket.gethostname()))
        with self._lock:
            self._trusted_until = sent + 0.9 * self.lease_s

    def describe(self) -> dict[str, Any]:
        """For /v1/state: how the cache is doing."""
        return {"trusted": self.trusted, "entries": len(self._entries), "ttl_s": self.ttl_s,
                "lease_s": self.lease_s, "applied_seq": self._applied, **self.stats}


def _answer(name: str, record: AdapterRecord | None) -> AdapterRecord:
    if record is None:
        raise UnknownAdapterError(f"adapter {name!r} not found", key=name)
    return record
