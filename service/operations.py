"""What the admin routes do, between parsing the request and answering it.

Each operation validates everything before it changes anything: an adapter is checked in full against
the base (`engine.validate`) before the store sees it, and the store commits atomically, so a failure
at any step leaves the store and the base weights as they were. The blocking parts (every store call,
tensor checks, disk writes) run in a worker thread; the engine's cache hints (`forget`, `prefetch`) are
given from the event loop, where the engine expects them.
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool

from adapters import AdapterError, ComposeResult, LoraWeights, compose
from service.engine import Engine
from service.metrics import Metrics
from service.schemas import ComposeRequest
from service.storage import AdapterExistsError, AdapterRecord, AdapterStore, canonicalize, check_name

__all__ = ["refuse_if_taken", "store_adapter", "compose_adapters", "delete_adapter"]


async def refuse_if_taken(store: AdapterStore, name: str, overwrite: bool) -> None:
    """Fail fast (before reading an upload) on a bad or taken name; store.put checks again atomically."""
    check_name(name)
    if not overwrite and await run_in_threadpool(store.exists, name):
        raise AdapterExistsError(f"adapter {name!r} already exists (use ?overwrite=true for a new version)", key=name)


def _validate_and_put(engine: Engine, store: AdapterStore, name: str, weights: LoraWeights, overwrite: bool,
                      meta: dict[str, Any] | None) -> AdapterRecord:
    engine.validate(weights)  # raises, naming the key, if the adapter does not fit the base
    return store.put(name, canonicalize(weights), overwrite=overwrite, meta=meta)  # serialized and hashed once


async def store_adapter(engine: Engine, store: AdapterStore, metrics: Metrics, name: str, weights: LoraWeights, *,
                        overwrite: bool, meta: dict[str, Any] | None = None) -> AdapterRecord:
    try:
        record = await run_in_threadpool(_validate_and_put, engine, store, name, weights, overwrite, meta)
    except Exception:
        metrics.uploads.labels(outcome="rejected").inc()
        raise
    metrics.uploads.labels(outcome="stored").inc()
    if record.version > 1:
        engine.forget(name, replaced=True)  # an older version may be cached or merged (and pinned)
    engine.prefetch(name)
    return record


def _compose(engine: Engine, store: AdapterStore, request: ComposeRequest) -> ComposeResult:
    items = []
    for item in request.adapters:
        # Validated first: the paths come back resolved against the base, so two adapters that name
        # one module differently (`bert.encoder...` and `encoder...`) add up in the same place.
        items.append((engine.validate(store.load_weights(item.name)), item.weight))
    result = compose(items, rank=request.rank)
    max_rank = engine.config.max_rank
    if result.weights.max_rank() > max_rank:
        raise AdapterError(f"the composition has rank {result.weights.max_rank()}, above the maximum {max_rank}; "
                           "pass a smaller \"rank\" to truncate it", field="rank")
    return result


async def compose_adapters(engine: Engine, store: AdapterStore, metrics: Metrics,
                           request: ComposeRequest) -> tuple[AdapterRecord, ComposeResult]:
    await refuse_if_taken(store, request.name, request.overwrite)
    result = await run_in_threadpool(_compose, engine, store, request)
    meta = {"composed_from": [item.model_dump() for item in request.adapters], "rank": request.rank,
            "relative_error": result.relative_error}
    record = await store_adapter(engine, store, metrics, request.name, result.weights, overwrite=request.overwrite,
                                 meta=meta)
    return record, result


async def delete_adapter(engine: Engine, store: AdapterStore, name: str) -> AdapterRecord:
    record = await run_in_threadpool(store.delete, name)
    engine.forget(name)  # drops it from every cache tier; unmerges first if it is merged
    return record
