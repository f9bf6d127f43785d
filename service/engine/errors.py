"""Engine-level errors; the HTTP layer maps each to a status (see service/errors.py)."""

from __future__ import annotations

import logging

from adapters.errors import UnknownAdapterError

__all__ = ["EngineError", "EngineBusyError", "WrongTaskError", "BadRequestError", "UnknownAdapterError",
           "NonFiniteOutputError", "AdapterChangedError", "InternalEngineError", "request_error"]

log = logging.getLogger(__name__)


class EngineError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class EngineBusyError(EngineError):
    """Not ready yet, shutting down, or the queue is full (HTTP 503)."""


class WrongTaskError(EngineError):
    """The request does not fit the loaded base, e.g. completions on an encoder (HTTP 400)."""


class BadRequestError(EngineError):
    """Inputs the engine cannot run: empty input, prompt longer than the model allows (HTTP 400)."""


class NonFiniteOutputError(EngineError):
    """The adapter drove the model's outputs to NaN or infinity for this input (HTTP 422)."""

    def __init__(self, adapter: str | None) -> None:
        super().__init__(f"adapter {adapter or 'base'!r} produced non-finite outputs (NaN or infinity) for this input; "
                         "its weights are too large for this base model and dtype")
        self.key = adapter


class AdapterChangedError(EngineError):
    """The adapter was deleted or replaced while a request was still generating with it, or before a queued
    request ran and its version's files are gone (HTTP 409)."""

    def __init__(self, adapter: str, replaced: bool, version: int | None = None) -> None:
        change = "replaced by a new version" if replaced else "deleted"
        if version is not None:  # queued with a version whose files are gone by the time it ran
            message = (f"adapter {adapter!r} version {version} was replaced or deleted before this request ran; "
                       "send the request again")
        else:
            message = (f"adapter {adapter!r} was {change} while this request was generating with it; "
                       "send the request again")
        super().__init__(message)
        self.key = adapter


class InternalEngineError(EngineError):
    """A forward failed for a reason that is the server's, not the request's (HTTP 500). The cause (kept as
    __cause__) is logged with its traceback; the client only learns that the fault was ours."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"the server failed while running this request ({type(cause).__name__}); the fault is "
                         "not in the request, and it was logged")
        self.__cause__ = cause


# What a request's own inputs or adapter can cause while its batch runs; anything else raised by a forward is
# the server's fault, even a domain error such as AdapterMismatchError (a routing bug, not a bad adapter).
_THE_REQUESTS_OWN = (EngineError, UnknownAdapterError)


def request_error(exc: Exception) -> Exception:
    """The error to answer a request with when its forward raised `exc`: the request's own errors as they
    are (400, 404, 409, 422...); anything else as an InternalEngineError (500), logged with its traceback."""
    if isinstance(exc, _THE_REQUESTS_OWN):
        return exc
    log.exception("a forward failed: answering its request with 500", exc_info=exc)
    return InternalEngineError(exc)
