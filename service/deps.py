"""FastAPI dependencies as `Annotated` aliases, so handlers read as plain signatures:

    async def upload(name: str, store: StoreDep, engine: EngineDep) -> AdapterInfo: ...

The app keeps its parts on `app.state` (settings, metrics and keys from `create_app`; store, base and
engine once the lifespan has started them). Auth is applied per router with `RequireAdmin` or
`RequireInference`.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import Principal, Role
from service.base_model import LoadedBase
from service.engine import Engine
from service.errors import NotReady
from service.metrics import Metrics
from service.settings import Settings
from service.storage import AdapterStore

__all__ = ["SettingsDep", "MetricsDep", "StoreDep", "EngineDep", "BaseDep", "RequireAdmin", "RequireInference",
           "AdminDep", "InferenceDep"]

_bearer = HTTPBearer(auto_error=False, description="An admin or inference API key (`Authorization: Bearer <key>`)")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _store(request: Request) -> AdapterStore:
    store = request.app.state.store
    if store is None:
        raise NotReady("the service is starting or stopping")
    return store


def _engine(request: Request) -> Engine:
    engine = request.app.state.engine
    if engine is None or not engine.ready:
        raise NotReady("the engine is not ready (starting or stopping)")
    return engine


def _base(request: Request) -> LoadedBase:
    base = request.app.state.base
    if base is None:
        raise NotReady("the base model is not loaded yet")
    return base


def _admin(request: Request, credentials: Credentials) -> Principal:
    return request.app.state.keys.authorize(credentials, Role.admin)


def _inference(request: Request, credentials: Credentials) -> Principal:
    return request.app.state.keys.authorize(credentials, Role.inference)


SettingsDep = Annotated[Settings, Depends(_settings)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
StoreDep = Annotated[AdapterStore, Depends(_store)]
EngineDep = Annotated[Engine, Depends(_engine)]
BaseDep = Annotated[LoadedBase, Depends(_base)]
AdminDep = Annotated[Principal, Depends(_admin)]
InferenceDep = Annotated[Principal, Depends(_inference)]
RequireAdmin = Depends(_admin)  # for APIRouter(dependencies=[...])
RequireInference = Depends(_inference)
