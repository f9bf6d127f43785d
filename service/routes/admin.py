"""/v1/state, /v1/unmerge and /v1/compose. Admin keys only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from service.deps import BaseDep, EngineDep, MetricsDep, RequireAdmin, StoreDep
from service.operations import compose_adapters
from service.routes import error_responses
from service.schemas import ComposeRequest, ComposeResponse, StateResponse

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[RequireAdmin], responses=error_responses(401, 403, 503))


@router.get("/state", response_model=StateResponse, summary="Merge state, resident adapters and fingerprints")
async def get_state(engine: EngineDep) -> StateResponse:
    """`fingerprint` is a sha256 over every base weight a merge can change, computed now;
    `pristine_fingerprint` is the same over the saved originals. They are equal when nothing is merged."""
    return StateResponse(**await engine.state())


@router.post("/unmerge", response_model=StateResponse, summary="Restore the pristine base weights (bit-exact)")
async def unmerge(engine: EngineDep) -> StateResponse:
    return StateResponse(**await engine.unmerge())


@router.post("/compose", status_code=201, response_model=ComposeResponse, summary="Store a weighted combination",
             responses=error_responses(404, 409, 422))
async def compose(body: ComposeRequest, engine: EngineDep, store: StoreDep, base: BaseDep, metrics: MetricsDep,
                  overwrite: Annotated[bool, Query(description="Store a new version if the name exists (as "
                                                               "\"overwrite\": true in the body)")] = False
                  ) -> ComposeResponse:
    """ΔW = Σ wᵢ·ΔWᵢ exactly (the ranks add up), or its best rank-`rank` approximation, whose relative
    Frobenius error is reported. The result is validated and stored like an upload."""
    if overwrite:  # the same switch as an upload's, so the 409's advice works here too
        body = body.model_copy(update={"overwrite": True})
    record, result = await compose_adapters(engine, store, metrics, body)
    return ComposeResponse.of(record, base.num_parameters, base.nbytes, relative_error=result.relative_error,
                              ranks=result.ranks)
