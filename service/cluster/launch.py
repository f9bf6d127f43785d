"""Start (or join) Ray, deploy the ingress and the replicas, serve until SIGINT/SIGTERM, stop cleanly.

    lora-serve --replicas 2                               # a local Ray instance on 127.0.0.1
    lora-serve --replicas 4 --ray-address 10.0.0.5:6379   # join a running cluster (service installed on every node)

Serve's HTTP proxy listens on --host:--port and forwards to LoraIngress, so clients see the single
server's API. Paths (store, base model) are made absolute first: replicas are other processes, maybe
other machines, where the store must be the same path (or, with the storage seam, the same URLs).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
from ray import serve
from ray.serve.config import RequestRouterConfig

from service.cluster.ingress import REPLICA_DEPLOYMENT, LoraIngress
from service.cluster.loopback import HOOK as LOOPBACK_HOOK
from service.cluster.replica import replica_class
from service.cluster.routing import ROUTERS
from service.settings import Settings

__all__ = ["APP_NAME", "absolute", "build_application", "start_ray", "deploy", "run_cluster"]

APP_NAME = "lora"
DEFAULT_CLUSTER_STORE = Path("store") / "cluster"
log = logging.getLogger("service.cluster")


def absolute(settings: Settings) -> Settings:
    """Paths made absolute (replicas may start in another directory). Without --store, the cluster's local parts
    (the SQLite index and blobs, unless --index-url / --blob-url say otherwise) live in ./store/cluster."""
    base = str(Path(settings.base_model).resolve()) if settings.base_model else None
    store = Path(settings.store) if settings.store is not None else DEFAULT_CLUSTER_STORE
    return settings.model_copy(update={"store": store.resolve(), "base_model": base})


def _scaling(settings: Settings) -> dict[str, Any]:
    if settings.max_replicas is None:
        return {"num_replicas": settings.replicas}
    return {"autoscaling_config": {"min_replicas": settings.min_replicas or 1, "max_replicas": settings.max_replicas,
                                   "initial_replicas": settings.replicas,
                                   "target_ongoing_requests": settings.target_ongoing_requests}}


def _logging(settings: Settings) -> dict[str, Any]:
    # No access-log line per request: at thousands of requests per second they cost the CPU the forwards
    # need, and /metrics counts requests by route and status already.
    return {"enable_access_log": False, "log_level": settings.log_level.upper()}


def build_application(settings: Settings) -> Any:
    router = ROUTERS[settings.cluster_router]
    kwargs = {"spill_at": settings.spill_at} if settings.cluster_router == "affinity" else {}
    replica = serve.deployment(replica_class(settings.device_cache_adapters), name=REPLICA_DEPLOYMENT).options(
        ray_actor_options={"num_cpus": settings.replica_num_cpus, "num_gpus": settings.replica_num_gpus},
        max_ongoing_requests=settings.replica_max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=router, request_router_kwargs=kwargs),
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
        logging_config=_logging(settings), **_scaling(settings))
    # The ingress only parses, resolves and forwards: no CPU reserved, so replicas get every core Ray counts.
    ingress = serve.deployment(LoraIngress, name="LoraIngress").options(
        num_replicas=settings.ingress_replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096,
        logging_config=_logging(settings))
    return ingress.bind(settings, replica.bind(settings))


def start_ray(settings: Settings) -> bool:
    """Connect to --ray-address (or RAY_ADDRESS), or start a local instance on loopback. True if started here."""
    if ray.is_initialized():
        return False
    if settings.ray_address or os.environ.get("RAY_ADDRESS"):  # Ray's own variable, as `ray.init()` reads it
        ray.init(address=settings.ray_address or os.environ["RAY_ADDRESS"], namespace="lora-service")
        return False
    # A local instance is one machine: keep every Ray listener on 127.0.0.1 (Ray's own switch for that). Ray reads
    # the variable when it is imported: the processes it starts inherit it, and this one, which imported Ray
    # already, gets the constant it set (otherwise the GCS, the raylet and the workers listen on every address).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].lower() in ("0", "false"):
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, namespace="lora-service",
             runtime_env={"worker_process_setup_hook": LOOPBACK_HOOK})
    return True


def deploy(settings: Settings) -> Any:
    """Deploy and wait until every replica is up; returns the ingress handle."""
    serve.start(http_options={"host": settings.host, "port": settings.port,
                              "request_timeout_s": settings.cluster_request_timeout_s + 10})
    return serve.run(build_application(settings), name=APP_NAME, route_prefix="/")


def run_cluster(settings: Settings) -> int:
    settings = absolute(settings)
    started = start_ray(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings)
        log.info("cluster: %d replica(s) of %s behind %d ingress(es) at http://%s:%d (router: %s)", settings.replicas,
                 settings.base_model or "all-MiniLM-L6-v2", settings.ingress_replicas, settings.host, settings.port,
                 settings.cluster_router)
        stop.wait()
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return 0
