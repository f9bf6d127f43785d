"""Every failure becomes one JSON shape with one status:

    {"error": {"message": "...", "type": "adapter_mismatch_error", "key": "base_model.model...lora_A.weight"}}

Domain errors (adapters.errors, service.engine.errors, the store's) are mapped by class below, so the
library and the engine never know about HTTP. HTTP-only failures raise a `ServiceError` subclass.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterError, UnknownAdapterError
from service.engine.errors import (
    AdapterChangedError,
    BadRequestError,
    EngineBusyError,
    EngineError,
    NonFiniteOutputError,
    WrongTaskError,
)
from service.storage import NAME_PATTERN, AdapterExistsError, MissingBlobError, StorageUnavailableError

__all__ = ["ServiceError", "BadRequest", "Unprocessable", "Unauthorized", "Forbidden", "NotFound", "PayloadTooLarge",
           "UnsupportedMediaType", "NotReady", "error_body", "status_of", "install_error_handlers"]

# pydantic's tags for the branch of a union in an error's loc: "str", "list[str]", "function-after[...]".
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])$")
log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, key: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.key, self.headers = message, key, headers


class BadRequest(ServiceError):
    status, type = 400, "invalid_request_error"


class Unprocessable(ServiceError):
    status, type = 422, "validation_error"


class Unauthorized(ServiceError):
    status, type = 401, "authentication_error"


class Forbidden(ServiceError):
    status, type = 403, "permission_error"


class NotFound(ServiceError):
    status, type = 404, "not_found_error"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type = 415, "unsupported_media_type"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


# First match wins, so subclasses come before their bases.
_DOMAIN_STATUS: list[tuple[type[Exception], int]] = [
    (UnknownAdapterError, 404),  # an adapter name that is not in the store
    (AdapterExistsError, 409),  # PUT without ?overwrite=true on a taken name
    (MissingBlobError, 500),  # an index row whose files are gone from the blob store (a damaged store)
    (StorageUnavailableError, 503),  # the index or the blob store cannot be reached
    (AdapterError, 422),  # bad files, unsupported features, shape/target mismatch, rank > max, merge refused
    (NonFiniteOutputError, 422),  # an adapter whose weights overflow the model's activations
    (AdapterChangedError, 409),  # deleted or replaced while a request was generating with it
    (WrongTaskError, 400),  # e.g. completions on an encoder
    (BadRequestError, 400),  # inputs the engine cannot run (prompt too long, empty input)
    (EngineBusyError, 503),  # not ready, shutting down
    (EngineError, 500),
]


def status_of(exc: Exception) -> int:
    if isinstance(exc, ServiceError):
        return exc.status
    return next((status for cls, status in _DOMAIN_STATUS if isinstance(exc, cls)), 500)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_body(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, ServiceError):
        kind, message, key = exc.type, exc.message, exc.key
    else:
        kind = _snake(type(exc).__name__)
        message = getattr(exc, "message", None) or str(exc)
        key = getattr(exc, "key", None)
    return {"error": {"message": message, "type": kind, "key": key}}


def error_response(exc: Exception) -> JSONResponse:
    headers = exc.headers if isinstance(exc, ServiceError) else None
    return JSONResponse(error_body(exc), status_code=status_of(exc), headers=headers)


async def _domain(_: Request, exc: Exception) -> JSONResponse:
    if status_of(exc) >= 500 and not isinstance(exc, (EngineBusyError, ServiceError)):
        log.error("request failed: %s", exc, exc_info=exc)
    return error_response(exc)


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR:  # JSON that is not UTF-8, or nested too deep
        body = {"error": {"message": "the request body is not valid JSON (it must be UTF-8 and nested less deeply)",
                          "type": "validation_error", "key": None}}
        return JSONResponse(body, status_code=422)  # the same answer as any other body that is not JSON
    kind = {404: "not_found_error", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    body = {"error": {"message": str(exc.detail), "type": kind, "key": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 when json.loads raises anything else


def _field_path(loc: tuple) -> str:
    """("body", "prompt", "list[str]", 0) -> "prompt.0": no location prefix, no union-branch tags."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(p for p in parts if not _UNION_TAG.match(p))


async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":  # the body is not JSON: loc holds a character offset, not a field
        position = first.get("loc", ("body", "?"))[-1]
        body = {"error": {"message": f"the request body is not valid JSON (at character {position}): "
                                     f"{first.get('ctx', {}).get('error', first.get('msg'))}",
                          "type": "validation_error", "key": None}}
        return JSONResponse(body, status_code=422)
    loc = _field_path(tuple(first.get("loc", ())))
    message = "; ".join(f"{_field_path(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors)
    if tuple(first.get("loc", ())) == ("path", "name"):  # the adapter name in the URL
        message = f"invalid adapter name {first.get('input')!r}: it must match {NAME_PATTERN}"
    body = {"error": {"message": message or "invalid request", "type": "validation_error", "key": loc or None}}
    return JSONResponse(body, status_code=422)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse({"error": {"message": "internal server error", "type": "internal_error", "key": None}},
                        status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _domain)
    app.add_exception_handler(AdapterError, _domain)
    app.add_exception_handler(EngineError, _domain)
    app.add_exception_handler(StorageUnavailableError, _domain)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
