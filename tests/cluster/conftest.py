"""One real local Ray cluster per test session: a Ray instance on 127.0.0.1, Serve with 2 replicas of a
tiny BERT, and a single server (in process) on its own store as the reference for outputs.

Ray is an optional extra (`pip install .[cluster]`): without it these tests are skipped with the reason.
Ray and Serve are always shut down, even when a test or the start-up fails.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # http_testkit: tiny models, keys
from http_testkit import ADMIN_KEY, bearer, build_bert, make_settings  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[cluster]')")
    import httpx
    import ray
    from ray import serve

    from service.cluster.launch import absolute, deploy, start_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token file in the home directory for a test run
    root = tmp_path_factory.mktemp("cluster")
    base = build_bert(root / "bert")
    settings = absolute(make_settings(base, root / "store", replicas=2, port=_free_port(), replica_num_cpus=0.5,
                                      max_rank=16, device_cache_adapters=12, cluster_pin_poll_s=0.5,
                                      cluster_request_timeout_s=30))
    started = False
    try:
        started = start_ray(settings)
        deploy(settings)
        with httpx.Client(base_url=f"http://127.0.0.1:{settings.port}", headers=bearer(ADMIN_KEY),
                          timeout=60) as client:
            yield {"client": client, "settings": settings, "base": base, "root": root}
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()


@pytest.fixture(scope="session")
def single(cluster: dict) -> Iterator:
    """A single server on the same base (its own store): what the cluster's answers must equal."""
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = make_settings(cluster["base"], cluster["root"] / "single-store", max_rank=16)
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        yield client
