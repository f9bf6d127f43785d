"""Liveness, readiness and Prometheus metrics. No auth: probes and scrapers carry no keys."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.deps import MetricsDep
from service.metrics import CONTENT_TYPE_LATEST
from service.schemas import Health

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="The base model is loaded and the engine runs",
            responses={503: {"model": Health, "description": "Starting or stopping"}})
async def readyz(request: Request) -> Health | JSONResponse:
    engine = request.app.state.engine
    if engine is None or not engine.ready:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return Health(status="ready")


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(metrics: MetricsDep) -> Response:
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
