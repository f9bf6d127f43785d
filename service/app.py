"""The FastAPI app: `create_app(settings)` wires the parts; the lifespan starts and stops them.

    settings ─► KeyRing (auth)           startup:  load_base_model(...)           (frozen, eval, no grad)
             ─► Metrics (own registry)             base_identity(base)            (which base this is)
                                                   open_store(settings), claim_store(identity), collect_garbage()
                                                   (local blobs only: a bucket is collected by `lora-store gc`)
                                                   Engine(base, settings, store, metrics).start()
    routers: health, adapters, admin, inference    shutdown: engine.stop(), store.close()

The base model loads during startup, before uvicorn accepts connections, so a wrong --base-model, a store
that belongs to another base, or an index or blob store that cannot be reached stops the process with its
reason (uvicorn exits with status 3) instead of leaving a server that can never become ready. Every store
call runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from adapters.merge_kernel import kernel_name
from service import __version__
from service.auth import KeyRing
from service.base_identity import base_identity, claim_store, default_store_dir
from service.base_model import set_torch_threads
from service.engine import Engine, load_base_model
from service.errors import install_error_handlers
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, MetricsMiddleware
from service.routes import adapters, admin, chat, health, inference
from service.settings import Settings
from service.storage import (
    DEFAULT_GRACE_S,
    AdapterStore,
    ForeignStoreError,
    StorageUnavailableError,
    open_store,
)
from service.storage.backends import describe_url, unreachable_message

__all__ = ["create_app"]

log = logging.getLogger("service")

_DESCRIPTION = """One frozen base model, many small LoRA adapters in PEFT format.

Upload adapters with `PUT /v1/adapters/{name}`, then name one in the `model` field of an
OpenAI-compatible inference request (`base` for none). Errors are JSON:
`{"error": {"message": ..., "type": ..., "param": ..., "code": ..., "key": ...}}` (OpenAI's shape, plus `key`).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings if settings is not None else Settings()
    app = FastAPI(title="lora-service", version=__version__, description=_DESCRIPTION, lifespan=_lifespan)
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.keys = KeyRing(settings.admin_keys, settings.inference_keys)
    app.state.store = app.state.base = app.state.engine = None
    install_error_handlers(app)
    for module in (health, adapters, admin, inference, chat):
        app.include_router(module.router)
    app.add_middleware(BodyLimitMiddleware, limit=int(settings.max_request_bytes))
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: it also counts the 413s
    return app


def _warn_about_auth(settings: Settings) -> None:
    if not settings.auth_enabled:
        exposed = "" if settings.is_loopback else f" and the service listens on {settings.host}, beyond this machine"
        log.warning("AUTH IS OFF: no API key is configured%s; anyone who can reach it may upload, delete and "
                    "merge adapters. Set --admin-keys / --inference-keys (LORA_ADMIN_KEYS / LORA_INFERENCE_KEYS).",
                    exposed)
    elif not settings.admin_keys:
        log.warning("no admin key is configured: uploads, deletes, merges and compositions are disabled")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    _warn_about_auth(settings)
    store: AdapterStore | None = None
    engine: Engine | None = None
    try:
        base = await run_in_threadpool(load_base_model, settings.base_model, settings.device, settings.dtype,
                                       settings.task)
        threads = set_torch_threads(settings.torch_threads)
        log.info("base model %s: task %s, %s parameters, %.1f MB %s on %s (%d torch threads); merges run on %s",
                 base.model_id, base.task, f"{base.num_parameters:,}", base.nbytes / 1e6, settings.dtype, base.device,
                 threads, kernel_name(base.device, base.dtype, fused=settings.merge_kernel == "auto"))
        identity = await run_in_threadpool(base_identity, base.model, base.model_id)
        if settings.store is None:  # one directory per base, so two bases never share a default store
            settings = settings.model_copy(update={"store": default_store_dir(identity)})
            app.state.settings = settings
        try:
            store = await run_in_threadpool(open_store, settings)
            await run_in_threadpool(claim_store, store.index, identity, store.location)
            if not (settings.blob_url or "").startswith("s3://"):  # local files: one directory walk and one query
                await run_in_threadpool(store.collect_garbage, DEFAULT_GRACE_S)
            else:  # listing a bucket on every start of every server is slow: `lora-store gc` runs it (cron)
                log.info("store: no collection at start for blobs in %s; run `lora-store gc` periodically",
                         describe_url(settings.blob_url or ""))
        except ForeignStoreError as exc:
            log.error("refusing to start: %s", exc)
            raise
        except StorageUnavailableError as exc:
            log.error("refusing to start: %s", unreachable_message(settings, exc))
            raise
        engine = Engine(base, settings, store, app.state.metrics)
        await engine.start()
        app.state.store, app.state.base, app.state.engine = store, base, engine
        count = await run_in_threadpool(store.count)
        log.info("store %s (base identity %s): %d adapters; ready", store.location, identity.short, count)
        yield
    finally:
        app.state.engine = None
        if engine is not None:
            await engine.stop()
        if store is not None:
            await run_in_threadpool(store.close)
        app.state.store = app.state.base = None
