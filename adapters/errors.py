"""Domain errors of the LoRA core. The service maps each class to one HTTP status."""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "AdapterError", "AdapterFormatError", "UnsupportedAdapterError", "AdapterMismatchError",
    "AdapterTooLargeError", "TargetNotFoundError", "MergeError", "UnknownAdapterError", "parse_json",
]


class AdapterError(Exception):
    """Base class. `key` names the offending tensor key or config field when there is one."""

    def __init__(self, message: str, *, key: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.key = key or field


class AdapterFormatError(AdapterError):
    """The bytes are not a valid adapter: bad JSON, truncated or corrupted safetensors, pickle, bad dtype."""


class UnsupportedAdapterError(AdapterError):
    """A valid PEFT adapter that uses a feature we do not implement (DoRA, lora_bias, ...)."""


class AdapterMismatchError(AdapterError):
    """The adapter does not fit the base model: unknown module, wrong shape, non-finite values."""


class AdapterTooLargeError(AdapterError):
    """Rank above the configured maximum, or a header claiming more bytes than allowed."""


class TargetNotFoundError(AdapterError):
    """Injection was asked for targets that match no module."""


class MergeError(AdapterError):
    """A merge was refused (e.g. it would produce non-finite weights). The base is left untouched."""


class UnknownAdapterError(AdapterError, KeyError):
    """The adapter name is not resident."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def parse_json(data: str | bytes, what: str) -> Any:
    """JSON from an uploaded file (adapter_config.json, a safetensors header). Whatever is wrong with it is the
    file's fault, so an AdapterFormatError naming `what`: a deeply nested document raises RecursionError, not
    ValueError, and would otherwise surface as a server error."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:
        raise AdapterFormatError(f"{what} is nested too deeply") from None
