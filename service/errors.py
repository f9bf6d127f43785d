"""Every failure becomes one JSON shape with one status, OpenAI's error object plus `key`:

    {"error": {"message": "...", "type": "adapter_mismatch_error", "param": "base_model.model...lora_A.weight",
               "code": "adapter_mismatch", "key": "base_model.model...lora_A.weight"}}

`param` is the offending request field, tensor key or config field (None when there is none); `code` is a
short stable machine string (OpenAI's where one fits: "model_not_found", "unknown_parameter"); `key` is
kept for clients written before `param` existed. The official `openai` client reads `.code` and `.param`.

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

from adapters.errors import AdapterError, AdapterTooLargeError, UnknownAdapterError
from lora_common.names import name_problem
from service.engine.errors import (
    AdapterChangedError,
    BadRequestError,
    EngineBusyError,
    EngineError,
    InternalEngineError,
    NonFiniteOutputError,
    WrongTaskError,
)
from service.storage import (
    AdapterExistsError,
    InvalidAdapterNameError,
    MissingBlobError,
    StorageUnavailableError,
)

__all__ = ["ServiceError", "BadRequest", "Unprocessable", "Unauthorized", "Forbidden", "NotFound", "PayloadTooLarge",
           "UnsupportedMediaType", "NotReady", "error_body", "status_of", "install_error_handlers"]

# pydantic's tags for the branch of a union in an error's loc: "str", "list[str]", "function-after[...]".
_UNION_TAG = re.compile(r"^(str|int|float|bool|bytes|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])$")
log = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, key: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.key, self.headers = message, key, headers


class BadRequest(ServiceError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unprocessable(ServiceError):
    status, type, code = 422, "validation_error", "invalid_value"


class Unauthorized(ServiceError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(ServiceError):
    status, type, code = 403, "permission_error", "permission_denied"


class NotFound(ServiceError):
    status, type, code = 404, "not_found_error", "not_found"


class PayloadTooLarge(ServiceError):
    status, type, code = 413, "payload_too_large", "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, type, code = 415, "unsupported_media_type", "unsupported_media_type"


class NotReady(ServiceError):
    status, type, code = 503, "not_ready", "not_ready"


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


# The machine-readable `code` of domain errors; any other class gets its snake-case name without "_error".
_DOMAIN_CODE: list[tuple[type[Exception], str]] = [
    (UnknownAdapterError, "model_not_found"),
    (AdapterExistsError, "adapter_exists"),
    (InvalidAdapterNameError, "invalid_name"),
    (AdapterTooLargeError, "adapter_too_large"),
    (BadRequestError, "invalid_request"),
    (EngineBusyError, "not_ready"),
]
# Errors about the adapter a request named in `model`: that field is the request's offending parameter.
_MODEL_ERRORS = (UnknownAdapterError, NonFiniteOutputError, AdapterChangedError)
_INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/classify", "/v1/models")


def status_of(exc: Exception) -> int:
    if isinstance(exc, ServiceError):
        return exc.status
    return next((status for cls, status in _DOMAIN_STATUS if isinstance(exc, cls)), 500)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _body(message: str, kind: str, code: str, param: str | None = None, key: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code, "key": key}}


def error_body(exc: Exception, path: str | None = None) -> dict[str, Any]:
    """The JSON body for `exc`; `path`, the request's, tells an adapter named in the URL (admin routes) from
    one named in `model` (inference, the default: streams call this without a request)."""
    if isinstance(exc, ServiceError):
        kind, message, key, code = exc.type, exc.message, exc.key, exc.code
    else:
        kind = _snake(type(exc).__name__)
        message = getattr(exc, "message", None) or str(exc)
        key = getattr(exc, "key", None)
        code = next((c for cls, c in _DOMAIN_CODE if isinstance(exc, cls)), kind.removesuffix("_error"))
    param = key
    if isinstance(exc, _MODEL_ERRORS) and (path is None or path.startswith(_INFERENCE_PATHS)):
        param = "model"
    elif isinstance(exc, UnknownAdapterError):  # named by an admin route: in its path, or in /v1/compose's body
        code = "adapter_not_found"
        param = _admin_param(path or "", key)
    return _body(message, kind, code, param, key)


def _admin_param(path: str, key: str | None) -> str:
    if path.startswith("/v1/adapters/"):
        return "filename" if key and path.endswith(f"/files/{key}") else "name"
    return "adapters" if path.startswith("/v1/compose") else "name"


def error_response(exc: Exception, path: str | None = None) -> JSONResponse:
    headers = exc.headers if isinstance(exc, ServiceError) else None
    return JSONResponse(error_body(exc, path), status_code=status_of(exc), headers=headers)


async def _domain(request: Request, exc: Exception) -> JSONResponse:
    # InternalEngineError was logged with its cause's traceback where the forward failed (engine/errors.py)
    if status_of(exc) >= 500 and not isinstance(exc, (EngineBusyError, ServiceError, InternalEngineError)):
        log.error("request failed: %s", exc, exc_info=exc)
    return error_response(exc, request.url.path)


async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _FASTAPI_PARSE_ERROR:  # JSON that is not UTF-8, or nested too deep
        body = _body("the request body is not valid JSON (it must be UTF-8 and nested less deeply)",
                     "validation_error", "invalid_json")
        return JSONResponse(body, status_code=422)  # the same answer as any other body that is not JSON
    kind, code = {404: ("not_found_error", "not_found"),
                  405: ("method_not_allowed", "method_not_allowed")}.get(exc.status_code, ("http_error", "http_error"))
    return JSONResponse(_body(str(exc.detail), kind, code), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


_FASTAPI_PARSE_ERROR = "There was an error parsing the body"  # FastAPI's 400 when json.loads raises anything else


def _field_path(loc: tuple) -> str:
    """("body", "prompt", "list[str]", 0) -> "prompt.0": no location prefix, no union-branch tags."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(p for p in parts if not _UNION_TAG.match(p))


# pydantic error types with an OpenAI code of their own; every other invalid field is "invalid_value".
_VALIDATION_CODES = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}
# What pydantic says when the body reached it as raw bytes: FastAPI parses JSON only when the Content-Type
# says so, and `curl -d` without -H sends application/x-www-form-urlencoded.
_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def _is_json(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    content_type = request.headers.get("content-type")
    if first.get("type") in _NOT_AN_OBJECT and tuple(first.get("loc", ())) == ("body",) and not _is_json(content_type):
        got = repr(content_type) if content_type else "no Content-Type"
        message = (f"the request body must be JSON sent with the header Content-Type: application/json (got "
                   f"{got}); with curl, add -H 'Content-Type: application/json'")
        return JSONResponse(_body(message, "unsupported_media_type", "unsupported_content_type"), status_code=415)
    if first.get("type") == "json_invalid":  # the body is not JSON: loc holds a character offset, not a field
        position = first.get("loc", ("body", "?"))[-1]
        message = (f"the request body is not valid JSON (at character {position}): "
                   f"{first.get('ctx', {}).get('error', first.get('msg'))}")
        return JSONResponse(_body(message, "validation_error", "invalid_json"), status_code=422)
    loc = _field_path(tuple(first.get("loc", ())))
    message = "; ".join(f"{_field_path(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in errors)
    code = _VALIDATION_CODES.get(str(first.get("type")), "invalid_value")
    if tuple(first.get("loc", ())) == ("path", "name"):  # the adapter name in the URL
        name = first.get("input")  # it failed the route's NAME_PATTERN: say so in check_name's words
        message, code = f"invalid adapter name {name!r}: {name_problem(name)}", "invalid_name"
    body = _body(message or "invalid request", "validation_error", code, loc or None, loc or None)
    return JSONResponse(body, status_code=422)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse(_body("internal server error", "internal_error", "internal_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _domain)
    app.add_exception_handler(AdapterError, _domain)
    app.add_exception_handler(EngineError, _domain)
    app.add_exception_handler(StorageUnavailableError, _domain)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _unexpected)
