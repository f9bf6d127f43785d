"""Thin routers: parse the request, call the store or the engine, answer. Errors map in service/errors.py."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.deps import RequireInference
from service.schemas import ErrorResponse

__all__ = ["error_responses", "inference_router"]

_DESCRIPTIONS = {
    400: "Invalid request (malformed form, wrong task for the base model, input the engine cannot run)",
    401: "Missing or invalid API key",
    403: "The key lacks the role (an inference key on an admin route)",
    404: "Unknown adapter or file",
    409: "The adapter name is taken (use ?overwrite=true)",
    413: "The upload exceeds max_upload_bytes",
    415: "Not multipart/form-data (uploads) or not application/json (JSON bodies), or a pickle file",
    422: "Invalid name, request or adapter (bad files, unsupported feature, mismatch with the base, rank too large)",
    503: "The engine is not ready",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for the OpenAPI schema: each status with the JSON error body."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def inference_router() -> APIRouter:
    """A router for OpenAI-compatible inference routes (completions, embeddings, chat, ...): one definition of
    who may call them (inference or admin keys) and of the errors they document."""
    return APIRouter(prefix="/v1", tags=["inference"], dependencies=[RequireInference],
                     responses=error_responses(400, 401, 404, 415, 422, 503))
