"""The PostgreSQL index's schema, as numbered migrations applied once per database.

    meta       key -> value                          store-wide facts (the base model's identity, the cluster's pins)
    adapters   name -> version, sha256, ...          what each name points at now
    versions   name -> last version ever given       so a version is never reused, even after a delete
    changes    seq (BIGSERIAL) -> name               one row per put/delete; `changes_since`, NOTIFY payloads;
                                                     old rows pruned by `prune_changes` (gc), the newest kept
    orphans    sha256 -> since                       blobs that lost their last row (garbage after a grace)
    listeners  id -> acked_seq, lease_until          name caches (name_cache.py) a writer waits for

Several servers may start at once on an empty database: `migrate` takes a transaction-scoped advisory
lock first, so one applies the migrations and the others wait, then find them applied. Names are
`COLLATE "C"` so that pages come in byte order, as in the SQLite index.
"""

from __future__ import annotations

import psycopg

__all__ = ["MIGRATIONS", "CHANNEL", "migrate"]

CHANNEL = "lora_adapters"  # NOTIFY payload: "<seq>:<name>"
_MIGRATION_LOCK = 0x6C6F7261_00000001  # pg_advisory_xact_lock key: "lora", migrations
CHANGES_LOCK = 0x6C6F7261_00000002  # taken by every put/delete just before it numbers its change

MIGRATIONS: list[str] = [
    # 1: the index
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE adapters (
        name           TEXT COLLATE "C" PRIMARY KEY,
        version        INTEGER NOT NULL,
        sha256         TEXT NOT NULL,
        bytes          BIGINT NOT NULL,
        rank           INTEGER NOT NULL,
        targets        JSONB NOT NULL,
        num_parameters BIGINT NOT NULL,
        task_type      TEXT,
        created_at     TEXT NOT NULL,
        meta           JSONB NOT NULL DEFAULT '{}'
    );
    CREATE INDEX adapters_by_sha256 ON adapters (sha256);
    CREATE TABLE versions (name TEXT COLLATE "C" PRIMARY KEY, last INTEGER NOT NULL);
    CREATE TABLE changes (
        seq  BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL,
        op   TEXT NOT NULL CHECK (op IN ('put', 'delete')),
        at   TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
    );
    CREATE TABLE orphans (sha256 TEXT PRIMARY KEY, since TIMESTAMPTZ NOT NULL);
    """,
    # 2: name caches' leases (name_cache.py)
    """
    CREATE TABLE listeners (
        id          TEXT PRIMARY KEY,
        acked_seq   BIGINT NOT NULL,
        lease_until TIMESTAMPTZ NOT NULL,
        host        TEXT NOT NULL DEFAULT ''
    );
    """,
]


def migrate(conn: psycopg.Connection) -> int:
    """Apply the migrations this database lacks, under the advisory lock; returns how many were applied."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                     "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied = 0
        for number, sql in enumerate(MIGRATIONS, start=1):
            if number in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
            applied += 1
        return applied
