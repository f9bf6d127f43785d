"""`lora-serve` chooses the cluster only when asked, refuses bad autoscaling bounds (and --ingress-replicas outside a
cluster), and explains a missing Ray."""

from __future__ import annotations

import sys

import pytest
from pydantic import ValidationError

from service import cli
from service.settings import Settings


def test_bad_autoscaling_bounds_are_refused() -> None:
    with pytest.raises(ValidationError, match="min-replicas <= --replicas <= --max-replicas"):
        Settings(replicas=5, max_replicas=4)


def test_ingress_replicas_are_a_cluster_setting() -> None:
    with pytest.raises(ValidationError, match="--ingress-replicas is for cluster mode"):
        Settings(ingress_replicas=2)
    assert Settings(replicas=2).ingress_replicas == 1
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[cluster]')")
    from service.cluster.launch import build_application

    ingress = build_application(Settings(replicas=2, ingress_replicas=3))._bound_deployment  # built, not deployed
    assert (ingress.name, ingress.num_replicas, ingress.init_args[1]._bound_deployment.num_replicas) == \
        ("LoraIngress", 3, 2)


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


def test_ray_address_joins_and_a_local_start_stays_on_loopback(monkeypatch) -> None:
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install '.[cluster]')")
    import ray

    from service.cluster import launch

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launch.start_ray(Settings(replicas=2, ray_address="10.0.0.5:6379")) is False
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6379")
    assert launch.start_ray(Settings(replicas=2)) is False
    monkeypatch.delenv("RAY_ADDRESS")
    assert launch.start_ray(Settings(replicas=2)) is True
    assert [c.get("address") for c in calls] == ["10.0.0.5:6379", "10.0.0.6:6379", None]
    local = calls[-1]
    assert local["_node_ip_address"] == "127.0.0.1" and local["include_dashboard"] is False
    assert local["runtime_env"]["worker_process_setup_hook"] == "service.cluster.loopback.bind_replica_grpc_to_loopback"
