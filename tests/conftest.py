"""Session-wide real servers for the shared-store backends (tests/infra.py): started on first use, stopped at the end.

    postgres_url   postgresql://postgres@127.0.0.1:<port>/postgres     (a throwaway PostgreSQL 15)
    s3_settings    {"endpoint_url", "region", "access_key_id", "secret_access_key", "bucket"}  (SeaweedFS)
    s3_env         s3_settings, with the standard AWS_* variables set for the rest of the session

Each is skipped, with the reason, where the server cannot run. `make_postgres_index(url)` and
`make_s3_blobs(settings)` return a fresh, empty backend on them each time (a new database, a new key
prefix; both in tests/infra.py), for the backends' tests and for the storage contract suite's backend fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from infra import PostgresServer, SeaweedS3Server, ServerUnavailable


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--store-backend", choices=("local", "shared"), default="local",
                     help="shared: the service's route tests keep adapters in the real PostgreSQL + S3 servers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("store_backend") != "shared":
        return
    skip = pytest.mark.skip(reason="inspects the embedded store (its files, location or start-up collection)")
    for item in items:
        if item.get_closest_marker("local_store"):
            item.add_marker(skip)


def _started_postgres() -> PostgresServer:
    """A throwaway PostgreSQL server, started; the test is skipped, with the reason, where none can run."""
    pytest.importorskip("psycopg", reason="psycopg is in the `shared` and `test` extras")
    server = PostgresServer()
    try:
        server.init()
        server.start()
    except ServerUnavailable as exc:
        server.cleanup()
        pytest.skip(f"PostgreSQL cannot run here: {exc}")
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = _started_postgres()
    yield server
    server.cleanup()


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, which it may stop and start again."""
    server = _started_postgres()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    return postgres_server.url


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3Server]:
    pytest.importorskip("boto3", reason="boto3 is in the `shared` and `test` extras")
    server = SeaweedS3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except ServerUnavailable as exc:
        pytest.skip(f"SeaweedFS cannot run here: {exc}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_settings(s3_server: SeaweedS3Server) -> dict[str, Any]:
    return s3_server.settings


_AWS = {"AWS_ENDPOINT_URL": "endpoint_url", "AWS_ACCESS_KEY_ID": "access_key_id",
        "AWS_SECRET_ACCESS_KEY": "secret_access_key", "AWS_DEFAULT_REGION": "region", "AWS_REGION": "region"}


@pytest.fixture(scope="session")
def s3_env(s3_settings: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The standard AWS_* variables for the test S3 server, for the whole session: an s3:// blob URL then finds it
    as a deployment would, in this process and in the processes it starts (crash tests' subprocesses, Ray's
    workers). Session-wide but not autouse: only a test that asks for S3 starts SeaweedFS."""
    saved = {var: os.environ.get(var) for var in _AWS}
    os.environ.update({var: str(s3_settings[key]) for var, key in _AWS.items()})
    yield s3_settings
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
