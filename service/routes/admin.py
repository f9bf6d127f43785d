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
FingerprintsQuery = Annotated[bool, Query(description="Also hash the base weights: sha256 over every Linear/Conv1D "
                                                      "weight, which reads them all")]


@router.get("/state", response_model=StateResponse, summary="Merge state, resident adapters, fingerprints on request",
            responses=error_responses(422))  # a `fingerprints` that is not a boolean
async def get_state(engine: EngineDep, store: StoreDep, fingerprints: FingerprintsQuery = False) -> StateResponse:
    """With `?fingerprints=true`, `fingerprint` is a sha256 over every base weight a merge can change, computed
    now, and `pristine_fingerprint` the same over the pristine weights (computed once, then cached); they are
    equal when nothing is merged. Without it both are null, and the answer costs no hashing. Inference waits
    only for the hash itself (it runs in a worker thread, under the WeightOwner's lock). `store` says where the
    adapters live (URLs without passwords) and, with a shared index, how the name cache does."""
    return StateResponse(**await engine.state(fingerprints=fingerprints), store=store.describe())


@router.post("/unmerge", response_model=StateResponse, summary="Restore the pristine base weights (bit-exact)")
async def unmerge(engine: EngineDep) -> StateResponse:
    """Answers the state without fingerprints (null); `GET /v1/state?fingerprints=true` checks the restore."""
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
