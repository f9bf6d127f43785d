"""The adapter name rule: the service enforces it on every upload, and lora-train checks `--name` against
it before a run that could take hours, so both read it from here.

    NAME_PATTERN     1-128 characters, letters, digits, '.', '_', '-', starting with a letter or digit
    RESERVED_NAMES   "base": the `model` value that asks for the bare base model, never an adapter
"""

from __future__ import annotations

import re

__all__ = ["NAME_PATTERN", "RESERVED_NAMES", "name_problem"]

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
RESERVED_NAMES = frozenset({"base"})
_NAME = re.compile(NAME_PATTERN)


def name_problem(name: object) -> str | None:
    """Why `name` cannot name an adapter, as a clause that follows the caller's subject ("invalid adapter
    name 'a/b': ...", "--name 'a/b': ..."), or None when it can."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        return f"adapter names must match {NAME_PATTERN}"
    if name in RESERVED_NAMES:
        return "it is reserved for the bare base model"
    return None
