"""Engine-level errors; the HTTP layer maps each to a status (see service/errors.py)."""

from __future__ import annotations

from adapters.errors import UnknownAdapterError

__all__ = ["EngineError", "EngineBusyError", "WrongTaskError", "BadRequestError", "UnknownAdapterError",
           "NonFiniteOutputError", "AdapterChangedError"]


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
    """The adapter was deleted or replaced while a request was still generating with it (HTTP 409)."""

    def __init__(self, adapter: str, replaced: bool) -> None:
        change = "replaced by a new version" if replaced else "deleted"
        super().__init__(f"adapter {adapter!r} was {change} while this request was generating with it; "
                         "send the request again")
        self.key = adapter
