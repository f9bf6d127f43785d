"""One real local Ray instance per test session (on 127.0.0.1), and Serve deployments on it: 2 replicas of a
tiny BERT on the embedded store (`cluster`), then, for the shared-store tests, 2 replicas behind 2 ingresses
on the real PostgreSQL + S3 servers (`shared_cluster`). A single server in process, on its own store, is the
reference for outputs (`single`).

Each deployment lives for its test module and is shut down after it, so only one Serve application runs
at a time. Ray's workers inherit the environment Ray started with, so the AWS_* variables of the test S3
server are set first where it can run (`s3_env`); without it, only the shared-store tests skip.

Ray is an optional extra (`pip install .[cluster]`): without it these tests are skipped with the reason.
Ray and Serve are always shut down, even when a test or the start-up fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # http_testkit: tiny models, keys
from http_testkit import ADMIN_KEY, bearer, build_bert, make_settings  # noqa: E402
from infra import free_port  # noqa: E402


@pytest.fixture(scope="session")
def ray_instance(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """{"root", "base", "s3"}: Ray started, a tiny BERT built; "s3": the S3 server's settings, or why it is absent."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[cluster]')")
    import ray

    from service.cluster.launch import start_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in the home directory for a test run
    try:
        s3: dict | str = request.getfixturevalue("s3_env")  # before Ray starts: its workers inherit AWS_*
    except pytest.skip.Exception as exc:
        s3 = str(exc)
    root = tmp_path_factory.mktemp("cluster")
    base = build_bert(root / "bert")
    started = False
    try:
        started = start_ray(make_settings(base, root / "unused", replicas=2))
        yield {"root": root, "base": base, "s3": s3}
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _deployed(ray_instance: dict, store: Path, **overrides) -> Iterator[dict]:
    import httpx
    from ray import serve

    from service.cluster.launch import absolute, deploy

    settings = absolute(make_settings(ray_instance["base"], store, replicas=2, port=free_port(), replica_num_cpus=0.5,
                                      max_rank=16, device_cache_adapters=12, cluster_pin_poll_s=0.5,
                                      cluster_request_timeout_s=30, **overrides))
    try:
        deploy(settings)
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", headers=bearer(ADMIN_KEY),
                          timeout=60) as client:
            yield {"client": client, "settings": settings, "base": ray_instance["base"]}
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def cluster(ray_instance: dict) -> Iterator[dict]:
    """2 replicas, 1 ingress, the embedded store (SQLite index and blobs in a directory they all read)."""
    with _deployed(ray_instance, ray_instance["root"] / "store") as deployed:
        yield deployed


@pytest.fixture(scope="module")
def shared_cluster(ray_instance: dict, postgres_url: str) -> Iterator[dict]:
    """2 replicas, 2 ingresses, a fresh PostgreSQL database and S3 prefix: the store of a multi-machine cluster."""
    from infra import create_database

    if isinstance(ray_instance["s3"], str):
        pytest.skip(ray_instance["s3"])
    index_url = create_database(postgres_url)
    blob_url = f"s3://{ray_instance['s3']['bucket']}/cluster-{uuid.uuid4().hex[:12]}"
    with _deployed(ray_instance, ray_instance["root"] / "shared-local", index_url=index_url, blob_url=blob_url,
                   ingress_replicas=2) as deployed:
        yield deployed


@pytest.fixture(scope="session")
def single(ray_instance: dict) -> Iterator:
    """A single server on the same base (its own store): what the cluster's answers must equal."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = make_settings(ray_instance["base"], ray_instance["root"] / "single-store", max_rank=16)
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        yield client
