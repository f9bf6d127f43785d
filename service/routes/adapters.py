"""/v1/adapters: upload, list, describe, download, delete and merge adapters. Admin keys only."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
from service.deps import BaseDep, EngineDep, MetricsDep, RequireAdmin, SettingsDep, StoreDep
from service.operations import delete_adapter, refuse_if_taken, store_adapter
from service.routes import error_responses
from service.schemas import AdapterInfo, AdapterList, DeletedAdapter, StateResponse
from service.storage import FILENAMES, NAME_PATTERN
from service.uploads import LABELS_FIELD, SINGLE_FIELD, check_label_count, content_boundary, read_adapter_upload

__all__ = ["router"]

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], dependencies=[RequireAdmin],
                   responses=error_responses(401, 403, 422))  # 422: any invalid path or query parameter

Name = Annotated[str, Path(pattern=NAME_PATTERN, description=f"Adapter name, matching {NAME_PATTERN}")]

_binary = {"type": "string", "format": "binary"}
_labels = {"type": "string", "description": "Optional: the classifier's label names as a JSON list "
                                            '(["paint", "tool"]); replaces those the files carry '
                                            '(safetensors __metadata__ "labels")'}
_UPLOAD_BODY = {
    "required": True,
    "content": {"multipart/form-data": {"schema": {"oneOf": [
        {"title": "PEFT directory", "type": "object", "required": [CONFIG_NAME, WEIGHTS_NAME],
         "properties": {CONFIG_NAME: _binary, WEIGHTS_NAME: _binary, LABELS_FIELD: _labels}},
        {"title": "Single file", "type": "object", "required": [SINGLE_FIELD],
         "properties": {SINGLE_FIELD: {**_binary, "description": "safetensors whose __metadata__ holds "
                                                                 "adapter_config as JSON"},
                        LABELS_FIELD: _labels}},
    ]}}},
}


@router.put("/{name}", status_code=201, response_model=AdapterInfo, summary="Upload an adapter",
            openapi_extra={"requestBody": _UPLOAD_BODY}, responses=error_responses(400, 409, 413, 415, 422, 503))
async def upload_adapter(name: Name, request: Request, store: StoreDep, engine: EngineDep, base: BaseDep,
                         settings: SettingsDep, metrics: MetricsDep,
                         overwrite: Annotated[bool, Query(description="Store a new version if the name exists")] = False
                         ) -> AdapterInfo:
    """A PEFT adapter as its two files (by field name or filename; other text files such as README.md are
    ignored), or in single-file form, with an optional `labels` field. It is validated in full against the
    base model (every key, shape, rank ≤ max_rank, finite values) before it is stored."""
    boundary = content_boundary(request)  # 415 before anything else is read
    await refuse_if_taken(store, name, overwrite)  # 409 before the body is read
    try:
        weights = await read_adapter_upload(request, boundary, int(settings.max_upload_bytes))
        check_label_count(weights, base.labels)
    except Exception:
        metrics.uploads.labels(outcome="rejected").inc()
        raise
    record = await store_adapter(engine, store, metrics, name, weights, overwrite=overwrite)
    return AdapterInfo.of(record, base.num_parameters, base.nbytes)


@router.get("", response_model=AdapterList, summary="List adapters (by name, paginated)")
async def list_adapters(store: StoreDep, base: BaseDep, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        after: Annotated[str | None, Query(description="The `next` of the previous page")] = None
                        ) -> AdapterList:
    (records, has_more), total = await run_in_threadpool(lambda: (store.list(limit=limit, after=after), store.count()))
    data = [AdapterInfo.of(r, base.num_parameters, base.nbytes) for r in records]
    return AdapterList(data=data, total=total, has_more=has_more,
                       next=records[-1].name if has_more and records else None)


@router.get("/{name}", response_model=AdapterInfo, summary="An adapter's metadata",
            responses=error_responses(404, 422))
async def get_adapter(name: Name, store: StoreDep, base: BaseDep) -> AdapterInfo:
    return AdapterInfo.of(await run_in_threadpool(store.get, name), base.num_parameters, base.nbytes)


@router.get("/{name}/files/{filename}", summary="Download one of the stored PEFT files", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}, "application/json": {}}},
                       **error_responses(404, 422)})
async def download_file(name: Name, filename: Annotated[str, Path(description=" or ".join(FILENAMES))],
                        store: StoreDep) -> Response:
    data = await run_in_threadpool(store.read_file, name, filename)
    media_type = "application/json" if filename == CONFIG_NAME else "application/octet-stream"
    return Response(data, media_type=media_type, headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.delete("/{name}", response_model=DeletedAdapter, summary="Delete an adapter",
               responses=error_responses(404, 422, 503))
async def remove_adapter(name: Name, store: StoreDep, engine: EngineDep) -> DeletedAdapter:
    record = await delete_adapter(engine, store, name)
    return DeletedAdapter(name=record.name, version=record.version)


@router.post("/{name}/merge", response_model=StateResponse, summary="Merge an adapter into the base weights",
             responses=error_responses(404, 422, 503))
async def merge_adapter(name: Name, engine: EngineDep) -> StateResponse:
    """W = W0 + s·B·A in place: zero overhead for requests naming it. Pins merged mode until
    POST /v1/unmerge; requests naming other adapters or `base` are still served exactly. The state answered
    has null fingerprints (hashing is left to `GET /v1/state?fingerprints=true`)."""
    return StateResponse(**await engine.merge(name))
