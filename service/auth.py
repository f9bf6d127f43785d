"""Bearer API keys with two roles.

    admin      upload, delete, merge, unmerge, compose, read the store and the state, and infer
    inference  /v1/completions, /v1/embeddings, /v1/classify and /v1/models only

A missing or unknown key is 401 (with `WWW-Authenticate: Bearer`); a valid key without the role is
403. Auth is off only when no key at all is configured, and the app logs a warning at start-up.
Keys are compared as sha256 digests with `hmac.compare_digest`, against every configured key, so the
time taken says nothing about how much of a key matched or which key it was.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum

from fastapi.security import HTTPAuthorizationCredentials

from service.errors import Forbidden, Unauthorized

__all__ = ["Role", "KeyRing", "Principal"]


class Role(StrEnum):
    admin = "admin"
    inference = "inference"


@dataclass(frozen=True)
class Principal:
    role: Role
    authenticated: bool  # False when auth is off


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyRing:
    def __init__(self, admin_keys: list[str], inference_keys: list[str]) -> None:
        self._keys = [(_digest(k), Role.admin) for k in admin_keys] + [(_digest(k), Role.inference)
                                                                        for k in inference_keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def role_of(self, key: str) -> Role | None:
        digest, found = _digest(key), None
        for candidate, role in self._keys:  # no early exit: every key is compared
            if hmac.compare_digest(digest, candidate) and found is None:
                found = role
        return found

    def authorize(self, credentials: HTTPAuthorizationCredentials | None, needed: Role) -> Principal:
        if not self.enabled:
            return Principal(Role.admin, authenticated=False)
        if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'", headers=_CHALLENGE)
        role = self.role_of(credentials.credentials)
        if role is None:
            raise Unauthorized("invalid API key", headers=_CHALLENGE)
        if needed is Role.admin and role is not Role.admin:
            raise Forbidden("this operation needs an admin key; inference keys may only run inference")
        return Principal(role, authenticated=True)
