"""`lora-serve` chooses the cluster only when asked, refuses bad autoscaling bounds, and explains a missing Ray."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from service import cli
from service.settings import Settings


def test_bad_autoscaling_bounds_are_refused() -> None:
    with pytest.raises(ValidationError, match="min-replicas <= --replicas <= --max-replicas"):
        Settings(replicas=5, max_replicas=4)


def test_without_ray_the_cluster_explains_how_to_install_it(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "service.cluster.launch", None)  # as if ray[serve] were not installed
    assert cli.main(["--replicas", "2"]) == 2
    assert "pip install '.[cluster]'" in capsys.readouterr().err


def test_one_replica_runs_the_single_server(monkeypatch) -> None:
    ran = {}
    monkeypatch.setattr(cli, "_run_cluster", lambda settings: ran.setdefault("cluster", settings))
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.setdefault("uvicorn", kw))
    assert cli.main([]) == 0
    assert "uvicorn" in ran and "cluster" not in ran
