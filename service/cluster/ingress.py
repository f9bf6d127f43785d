"""LoraIngress: the HTTP entry of a cluster. The routes of service/routes, unchanged, over a ClusterEngine.

It opens the shared store (uploads, deletes, compositions and listings happen here, once, for every
replica) and loads its own copy of the base model on the CPU, which it uses only to validate uploads
and to describe the model (/v1/models, the embedding width); it serves no inference itself.

`/metrics` is registered ahead of the health router's, so it answers for the whole cluster
(metrics_merge.py); every other route is the single server's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from ray import serve

from service import __version__
from service.app import _DESCRIPTION
from service.auth import KeyRing
from service.cluster.metrics_merge import merge_metrics
from service.cluster.proxy import ClusterEngine
from service.cluster.store_view import open_store
from service.engine import load_base_model
from service.errors import install_error_handlers
from service.limits import BodyLimitMiddleware
from service.metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from service.routes import adapters, admin, chat, health, inference

__all__ = ["LoraIngress", "build_ingress_app", "REPLICA_DEPLOYMENT"]

REPLICA_DEPLOYMENT = "LoraReplica"

_metrics_router = APIRouter(tags=["health"])


@_metrics_router.get("/metrics", summary="Prometheus metrics of the ingress and of every replica (label `replica`)",
                     response_class=Response,
                     responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def cluster_metrics(request: Request) -> Response:
    engine: ClusterEngine = request.app.state.engine
    answers = await engine.fanout("metrics")
    text = merge_metrics(request.app.state.metrics.render(),
                         [(rid, r) for rid, r in answers if isinstance(r, bytes)])
    return Response(text, media_type=CONTENT_TYPE_LATEST)


def build_ingress_app(settings: Any, base: Any, store: Any, engine: ClusterEngine, metrics: Metrics) -> FastAPI:
    """As service.app.create_app, with the parts already started (Serve starts them in the constructor)."""
    app = FastAPI(title="lora-service (cluster)", version=__version__, description=_DESCRIPTION)
    app.state.settings, app.state.metrics = settings, metrics
    app.state.keys = KeyRing(settings.admin_keys, settings.inference_keys)
    app.state.store, app.state.base, app.state.engine = store, base, engine
    install_error_handlers(app)
    app.include_router(_metrics_router)  # first: it shadows the single server's /metrics
    for module in (health, adapters, admin, inference, chat):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, limit=int(settings.max_request_bytes))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


@serve.ingress()
class LoraIngress:
    async def __init__(self, settings: Any, replicas: Any) -> None:
        self.settings = settings
        self.store = open_store(settings)
        self.base = await asyncio.to_thread(load_base_model, settings.base_model, "cpu", settings.dtype,
                                            settings.task)
        self.metrics = Metrics()
        self.engine = ClusterEngine(settings, self.base, self.store, replicas, REPLICA_DEPLOYMENT)
        self._warm_up = asyncio.get_running_loop().create_task(self.engine.warm_up())

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self.settings, self.base, self.store, self.engine, self.metrics)
