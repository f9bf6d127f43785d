"""Keep a local cluster on loopback: Ray Serve binds each replica's internal gRPC server to `[::]:0`.

Every other listener of a local Ray instance follows `_node_ip_address="127.0.0.1"` (with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0); this one is hard-coded in ray/serve/_private/replica.py (2.60). The
launcher installs this module's hook as the job's `worker_process_setup_hook` for a *local* instance only
(one machine: nothing outside needs to reach a replica), so each worker binds that server to 127.0.0.1.
It patches a private Ray name; if Ray moves it, the hook does nothing and says so in the worker's log.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["HOOK", "bind_replica_grpc_to_loopback"]

HOOK = "service.cluster.loopback.bind_replica_grpc_to_loopback"


def bind_replica_grpc_to_loopback() -> None:
    try:
        from ray.serve._private import replica
    except ImportError:  # a worker without Serve: nothing to do
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "_lora_loopback", False):
        if original is None:
            logging.getLogger("service.cluster").warning("Ray moved add_port_to_grpc_server: replica gRPC "
                                                         "servers keep Ray's default address")
        return

    def bind(server: Any, address: str) -> int:
        return original(server, "127.0.0.1:0" if address == "[::]:0" else address)

    bind._lora_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = bind
