"""CachedIndex on a real PostgreSQL: after a write returns on one server, every other server's next `get` answers
the new state; the cache answers only under a live lease; a listener that drops catches up; a frozen listener
delays writes by at most its lease."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from infra import create_database

from adapters import UnknownAdapterError
from service.storage.interfaces import AdapterIndex, NewAdapter, StorageUnavailableError
from service.storage.name_cache import CachedIndex
from service.storage.postgres_index import PostgresIndex


def new(name: str, sha: str = "a") -> NewAdapter:
    return NewAdapter(name=name, sha256=sha * 64, bytes=10, rank=4, targets=["q"], num_parameters=64, task_type=None)


def wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def two_servers(postgres_url):
    """Server A writes through a plain PostgresIndex; server B reads through a CachedIndex (another pool)."""
    url = create_database(postgres_url)
    writer = PostgresIndex(url, timeout_s=2)
    reader = CachedIndex(PostgresIndex(url, timeout_s=2), ttl_s=30, lease_s=3)  # renewed each second
    wait_until(lambda: reader.trusted)
    yield writer, reader
    reader.close()
    writer.close()


def test_is_an_adapter_index(two_servers):
    assert isinstance(two_servers[1], AdapterIndex)


def test_meta_goes_straight_to_the_index(two_servers):
    writer, reader = two_servers
    assert reader.compare_and_set_meta("pins", None, "a") and writer.get_meta("pins") == "a"
    assert writer.compare_and_set_meta("pins", "a", "b") and reader.get_meta("pins") == "b"  # never cached
    assert not reader.compare_and_set_meta("pins", "a", "c") and reader.get_meta("pins") == "b"


def test_gets_are_served_from_the_cache(two_servers):
    writer, reader = two_servers
    rec, _ = writer.put(new("a"), overwrite=False)
    assert reader.get("a") == rec
    misses = reader.stats["misses"]
    for _ in range(50):
        assert reader.get("a") == rec
    assert reader.stats["misses"] == misses and reader.stats["hits"] >= 50


def test_no_stale_answer_after_a_write_on_another_server_returns(two_servers):
    writer, reader = two_servers
    writer.put(new("hot"), overwrite=False)
    for i in range(40):
        assert reader.get("hot").version == i + 1  # cached now
        version = writer.put(new("hot", "ab"[i % 2]), overwrite=True)[0].version
        assert reader.get("hot").version == version  # the very next get, no sleep
    writer.delete("hot")
    with pytest.raises(UnknownAdapterError):
        reader.get("hot")
    with pytest.raises(UnknownAdapterError):  # a cached "no such name" ...
        reader.get("hot")
    writer.put(new("hot"), overwrite=False)
    assert reader.get("hot").version == 42  # ... is invalidated like any other entry


def test_writes_through_the_cache_are_seen_at_once(two_servers):
    writer, reader = two_servers
    reader.put(new("w"), overwrite=False)
    assert reader.get("w").version == 1 and writer.get("w").version == 1
    reader.delete("w")
    with pytest.raises(UnknownAdapterError):
        reader.get("w")


def test_a_dropped_listener_answers_from_the_index_then_catches_up(two_servers):
    writer, reader = two_servers
    writer.put(new("c"), overwrite=False)
    assert reader.get("c").version == 1
    gate = threading.Event()
    connect = reader._connect

    def held_connect():  # the listener's reconnection waits until the test lets it through
        gate.wait(10)
        return connect()

    reader._connect = held_connect
    with psycopg.connect(writer.url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = "
                      "'lora-name-cache' AND datname = current_database()")
    wait_until(lambda: not reader.trusted)
    writer.put(new("c", "b"), overwrite=True)  # notified to nobody: the listener is down, its lease lapsed
    assert reader.get("c").version == 2  # untrusted: straight from the index
    gate.set()
    wait_until(lambda: reader.trusted)
    assert reader.stats["reconnects"] == 1
    assert reader.get("c").version == 2
    writer.put(new("c"), overwrite=True)
    assert reader.get("c").version == 3


def test_catch_up_invalidates_what_changed_while_disconnected(postgres_url):
    url = create_database(postgres_url)
    writer = PostgresIndex(url, timeout_s=2)
    reader = CachedIndex(PostgresIndex(url, timeout_s=2), ttl_s=60, lease_s=30)
    try:
        wait_until(lambda: reader.trusted)
        writer.put(new("k"), overwrite=False)
        assert reader.get("k").version == 1
        # A change the listener never heard of (as while it was disconnected: NOTIFY does not replay), then
        # the catch-up a reconnection runs before it renews its lease.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO changes (name, op) VALUES ('k', 'put')")
            conn.execute("UPDATE adapters SET version = 99 WHERE name = 'k'")
            assert reader.get("k").version == 1  # nothing told the cache
            reader._catch_up(conn)
        assert reader.get("k").version == 99
    finally:
        reader.close()
        writer.close()


def test_a_catch_up_point_pruned_away_drops_the_whole_cache(postgres_url):
    url = create_database(postgres_url)
    writer = PostgresIndex(url, timeout_s=2)
    reader = CachedIndex(PostgresIndex(url, timeout_s=2), ttl_s=60, lease_s=30)
    try:
        wait_until(lambda: reader.trusted)
        writer.put(new("k"), overwrite=False)
        writer.put(new("other"), overwrite=False)
        assert reader.get("k").version == 1 and reader.get("other").version == 1
        # While the listener was (as it were) disconnected: "other" changed, then "k", and a collection pruned the
        # log down to its newest row, so the record of the change to "other" is gone.
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO changes (name, op) VALUES ('other', 'put')")
            conn.execute("UPDATE adapters SET version = 99 WHERE name = 'other'")
            conn.execute("INSERT INTO changes (name, op) VALUES ('k', 'put')")
            conn.execute("DELETE FROM changes WHERE seq < (SELECT max(seq) FROM changes)")
            assert reader.get("other").version == 1  # nothing told the cache
            reader._catch_up(conn)
        assert reader.get("other").version == 99  # not just "k": everything was dropped
        assert reader.stats["resyncs"] == 1 and reader.describe()["applied_seq"] == writer.sequence()
    finally:
        reader.close()
        writer.close()


def test_a_frozen_listener_delays_writes_by_at_most_its_lease(two_servers):
    writer, reader = two_servers
    with psycopg.connect(writer.url, autocommit=True) as conn:  # a server that stopped acking, lease 3 s
        conn.execute("INSERT INTO listeners (id, acked_seq, lease_until) VALUES "
                     "('frozen', 0, clock_timestamp() + interval '3 seconds')")
    started = time.monotonic()
    writer.put(new("f"), overwrite=False)
    waited = time.monotonic() - started
    assert 1.0 < waited < 8, waited
    started = time.monotonic()
    writer.put(new("f", "b"), overwrite=True)  # the lapsed lease no longer counts
    assert time.monotonic() - started < 1.0


def test_index_unreachable_serves_young_entries_only(two_servers, monkeypatch):
    writer, reader = two_servers
    writer.put(new("s"), overwrite=False)
    assert reader.get("s").version == 1

    def down(name):
        raise StorageUnavailableError("index", "down")

    monkeypatch.setattr(reader.index, "get", down)
    reader._distrust()  # as when the listener loses the same server
    assert reader.get("s").version == 1 and reader.stats["stale_served"] == 1
    with pytest.raises(StorageUnavailableError):
        reader.get("never-seen")
    reader.ttl_s = 0.0  # older than the TTL: no answer rather than an old one
    with pytest.raises(StorageUnavailableError):
        reader.get("s")


def test_the_listener_row_goes_at_close(postgres_url):
    url = create_database(postgres_url)
    reader = CachedIndex(PostgresIndex(url, timeout_s=2), ttl_s=5, lease_s=1.5)
    wait_until(lambda: reader.trusted)
    reader.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM listeners").fetchone()[0] == 0


def test_concurrent_readers_never_see_a_version_older_than_the_last_completed_write(postgres_url):
    """Servers B and C (caches) read in a loop while A overwrites; each get must answer at least the version of
    the last put that had returned before the get started."""
    url = create_database(postgres_url)
    writer = CachedIndex(PostgresIndex(url, timeout_s=2), ttl_s=30, lease_s=1.5)
    readers = [CachedIndex(PostgresIndex(url, timeout_s=2), ttl_s=30, lease_s=1.5) for _ in range(2)]
    try:
        wait_until(lambda: writer.trusted and all(r.trusted for r in readers))
        completed = writer.put(new("race"), overwrite=False)[0].version
        stop, stale, reads = threading.Event(), [], [0]

        def read(reader):
            while not stop.is_set():
                floor = completed
                got = reader.get("race").version
                reads[0] += 1
                if got < floor:
                    stale.append((floor, got))
                time.sleep(0)  # let the writer and the listeners have the GIL too

        threads = [threading.Thread(target=read, args=(r,)) for r in readers]
        for t in threads:
            t.start()
        for i in range(60):
            completed = writer.put(new("race", "ab"[i % 2]), overwrite=True)[0].version
        stop.set()
        for t in threads:
            t.join()
        assert stale == [] and reads[0] > 60
        assert sum(r.stats["hits"] for r in readers) > 0  # the cache did answer in between
    finally:
        for c in (*readers, writer):
            c.close()


def test_server_stopped_then_restarted_under_a_live_cache(private_postgres):
    server = private_postgres
    url = create_database(server.url)
    writer = PostgresIndex(url, timeout_s=1)
    reader = CachedIndex(PostgresIndex(url, timeout_s=1), ttl_s=60, lease_s=1.5)
    wait_until(lambda: reader.trusted)
    writer.put(new("a"), overwrite=False)
    assert reader.get("a").version == 1
    server.stop()
    wait_until(lambda: not reader.trusted)
    assert reader.get("a").version == 1 and reader.stats["stale_served"] >= 1  # young entry, index down
    with pytest.raises(StorageUnavailableError) as err:
        reader.get("b")
    assert err.value.component == "index"
    server.start()
    wait_until(lambda: reader.trusted, timeout_s=20)  # the listener reconnected by itself
    assert writer.put(new("a", "b"), overwrite=True)[0].version == 2  # the same clients, no restart
    assert reader.get("a").version == 2
    for c in (reader, writer):
        c.close()
