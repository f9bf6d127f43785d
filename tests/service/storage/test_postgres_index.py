"""PostgresIndex against a real PostgreSQL 15 (tests/infra.py): the AdapterIndex contract, concurrency across
connections and processes, NOTIFY, and a server that stops and comes back under a live client."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from infra import create_database, make_postgres_index

from adapters import UnknownAdapterError
from service.storage.interfaces import AdapterIndex, NewAdapter, StorageUnavailableError
from service.storage.postgres_index import AdapterExistsError, PostgresIndex
from service.storage.postgres_schema import CHANNEL, MIGRATIONS

ROOT = Path(__file__).resolve().parents[3]


def new(name: str, sha: str = "a", **kw) -> NewAdapter:
    return NewAdapter(name=name, sha256=sha * (64 // len(sha)), bytes=1234, rank=8, targets=["q", "v"],
                      num_parameters=4096, task_type="CAUSAL_LM", **kw)


@pytest.fixture
def index(postgres_url):
    ix = make_postgres_index(postgres_url)
    yield ix
    ix.close()


def test_is_an_adapter_index(index):
    assert isinstance(index, AdapterIndex)


def test_put_get_overwrite_delete_and_versions_never_reused(index):
    with pytest.raises(UnknownAdapterError):
        index.get("a")
    rec, old = index.put(new("a", meta={"composed_of": ["x"]}), overwrite=False)
    assert old is None and rec.version == 1 and rec.meta == {"composed_of": ["x"]}
    assert rec.created_at.endswith("+00:00") and len(rec.created_at.split(".")[1]) == 3 + 6  # ms + offset
    assert index.get("a") == rec
    with pytest.raises(AdapterExistsError):
        index.put(new("a", "b"), overwrite=False)
    assert index.get("a") == rec  # the refused put changed nothing
    rec2, old2 = index.put(new("a", "b"), overwrite=True)
    assert (rec2.version, rec2.sha256, old2) == (2, "b" * 64, rec)
    assert index.delete("a") == rec2
    with pytest.raises(UnknownAdapterError):
        index.delete("a")
    with pytest.raises(UnknownAdapterError):
        index.get("a")
    rec3, old3 = index.put(new("a", "c"), overwrite=False)
    assert (rec3.version, old3) == (3, None)  # after a delete, the next version, not 1 again


def test_explicit_version_and_date_are_kept_but_never_reused(index):
    rec, _ = index.put(new("m", version=7, created_at="2024-01-02T03:04:05.678+00:00"), overwrite=False)
    assert (rec.version, rec.created_at) == (7, "2024-01-02T03:04:05.678+00:00")
    assert index.get("m") == rec
    with pytest.raises(ValueError, match="reuse"):
        index.put(new("m", "b", version=7), overwrite=True)
    assert index.put(new("m", "b"), overwrite=True)[0].version == 8


def test_list_pages_in_byte_order_and_count(index):
    names = ["b", "B", "a-1", "a.b", "a_b", "Z9", "a"]
    for n in names:
        index.put(new(n), overwrite=False)
    assert index.count() == len(names)
    seen, after = [], None
    while True:
        page, more = index.list(limit=3, after=after)
        seen += [r.name for r in page]
        if not more:
            break
        after = page[-1].name
    assert seen == sorted(names)  # Python's order is byte order, as in SQLite: "B" < "Z9" < "a" < "a-1"
    assert index.list(limit=100, after="b") == ([], False)


def test_referenced_orphans_and_forget(index):
    index.put(new("x", "a"), overwrite=False)
    index.put(new("y", "a"), overwrite=False)
    index.put(new("x", "b"), overwrite=True)  # "a" still has y
    assert index.referenced() == {"a" * 64, "b" * 64} and index.orphans(0) == []
    index.delete("y")
    assert index.orphans(0) == ["a" * 64]
    assert index.orphans(3600) == []  # not orphaned long enough
    index.put(new("z", "a"), overwrite=False)  # the same bytes come back: no longer an orphan
    assert index.orphans(0) == [] and index.forget_orphan("a" * 64) is False
    index.delete("z")
    assert index.forget_orphan("a" * 64) is True
    assert index.orphans(0) == [] and index.forget_orphan("a" * 64) is False


def test_sequence_and_changes_since(index):
    assert index.sequence() == 0 and index.changes_since(0) == []
    index.put(new("a"), overwrite=False)
    index.put(new("b"), overwrite=False)
    index.delete("a")
    with pytest.raises(AdapterExistsError):  # a refused put is no change
        index.put(new("b"), overwrite=False)
    assert index.sequence() == 3
    assert index.changes_since(0) == [(1, "a"), (2, "b"), (3, "a")]
    assert index.changes_since(2) == [(3, "a")]


def test_meta(index):
    assert index.get_meta("base") is None
    assert index.set_meta_if_absent("base", "one") == "one"
    assert index.set_meta_if_absent("base", "two") == "one"
    assert index.get_meta("base") == "one"


def test_every_change_is_notified_with_its_seq(index):
    with psycopg.connect(index.url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        index.put(new("n"), overwrite=False)
        index.delete("n")
        got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
    assert got == ["1:n", "2:n"]


def test_two_clients_creating_one_name_exactly_one_wins(postgres_url):
    url = create_database(postgres_url)
    clients = [PostgresIndex(url, timeout_s=5) for _ in range(2)]
    try:
        for round_ in range(10):
            barrier, results = threading.Barrier(4), []

            def put(ix, i, round_=round_, barrier=barrier, results=results):
                barrier.wait()
                try:
                    results.append(ix.put(new(f"n{round_}", "abcd"[i]), overwrite=False)[0])
                except AdapterExistsError:
                    results.append(None)

            threads = [threading.Thread(target=put, args=(clients[i % 2], i)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            winners = [r for r in results if r is not None]
            assert len(winners) == 1 and winners[0].version == 1
            assert clients[0].get(f"n{round_}") == winners[0]
    finally:
        for c in clients:
            c.close()


def test_concurrent_overwrites_get_distinct_versions_and_ordered_changes(postgres_url):
    url = create_database(postgres_url)
    clients = [PostgresIndex(url, timeout_s=5) for _ in range(2)]
    try:
        versions: list[int] = []
        lock = threading.Lock()

        def writer(ix, sha):
            for _ in range(8):
                v = ix.put(new("hot", sha), overwrite=True)[0].version
                with lock:
                    versions.append(v)

        threads = [threading.Thread(target=writer, args=(clients[i % 2], "ab"[i % 2])) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(versions) == list(range(1, 33))
        changes = clients[1].changes_since(0)
        assert [s for s, _ in changes] == sorted(s for s, _ in changes) and len(changes) == 32
    finally:
        for c in clients:
            c.close()


def test_migrations_run_once_from_concurrent_processes(postgres_url):
    url = create_database(postgres_url)
    # The schema module alone (psycopg, no torch), so that the processes start together and race.
    code = ("import sys, psycopg; from service.storage.postgres_schema import migrate; "
            "conn = psycopg.connect(sys.argv[1], autocommit=True); print(migrate(conn))")
    procs = [subprocess.Popen([sys.executable, "-c", code, url], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={"PYTHONPATH": str(ROOT)}) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sorted(o.strip() for o, _ in outs) == ["0", "0", "0", str(len(MIGRATIONS))]  # one applied them all
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall() == [
            (i,) for i in range(1, len(MIGRATIONS) + 1)]


def test_unreachable_server_is_storage_unavailable():
    ix = PostgresIndex(f"postgresql://postgres@127.0.0.1:{_closed_port()}/x", timeout_s=0.5)
    try:
        with pytest.raises(StorageUnavailableError) as err:
            ix.get("a")
        assert err.value.component == "index"
    finally:
        ix.close()


def test_after_a_failure_calls_fail_at_once_then_one_probes():
    """Without the breaker, every request would wait timeout_s for a connection while the server is down."""
    ix = PostgresIndex(f"postgresql://postgres@127.0.0.1:{_closed_port()}/x", timeout_s=1.0)
    try:
        with pytest.raises(StorageUnavailableError):
            ix.get("a")  # waits for a connection
        started = time.monotonic()
        for _ in range(20):
            with pytest.raises(StorageUnavailableError, match="retried every"):
                ix.get("a")
        assert time.monotonic() - started < 0.5
        time.sleep(ix.retry_s)
        with pytest.raises(StorageUnavailableError) as err:
            ix.count()  # a probe: it waits for a connection again
        assert "retried every" not in str(err.value)
    finally:
        ix.close()


def test_server_stopped_then_restarted_under_a_live_client(private_postgres):
    server = private_postgres
    ix = PostgresIndex(create_database(server.url), timeout_s=1.0, max_size=4)
    ix.put(new("a"), overwrite=False)
    server.stop()
    for call in (lambda: ix.get("a"), lambda: ix.put(new("b"), overwrite=False), ix.count):
        started = time.monotonic()
        with pytest.raises(StorageUnavailableError) as err:
            call()
        assert err.value.component == "index" and time.monotonic() - started < 10
    server.start()
    deadline = time.monotonic() + 15  # the pool reconnects by itself; no new client
    while True:
        try:
            assert ix.get("a").version == 1
            break
        except StorageUnavailableError:
            assert time.monotonic() < deadline, "the client did not recover after the restart"
            time.sleep(0.2)
    recovered_in = 15 - (deadline - time.monotonic())
    assert recovered_in < 5, recovered_in
    assert ix.put(new("b"), overwrite=False)[0].version == 1
    ix.close()


def _closed_port() -> int:
    from infra import free_port

    return free_port()
